"""docs/troubleshooting.md lists every user-facing error: its catalogue must match the source."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("error_catalogue", ROOT / "tools" / "error_catalogue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_error_catalogue_is_up_to_date():
    tool = _tool()
    page = tool.PAGE.read_text(encoding="utf-8")
    assert tool.updated_page(page) == page, "docs/troubleshooting.md is stale: run python tools/error_catalogue.py"


def test_the_catalogue_finds_messages_with_their_runtime_parts(tmp_path):
    tool = _tool()
    src = tmp_path / "m.py"
    src.write_text('def f(p):\n    raise EdgestillError(f"corpus \'{p}\' not found: " + "give a folder")\n')
    assert tool._messages(src) == [("f", "corpus '<p>' not found: give a folder")]
