"""edgestill: shrink a Hugging Face LLM for your device, measured against its teacher.

Importing the package is cheap: torch and transformers load only when a verb runs.
"""

__version__ = "0.1.0"

from edgestill.errors import EdgestillError  # noqa: E402  (light: no heavy imports)

__all__ = ["EdgestillError", "__version__"]
