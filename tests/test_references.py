"""Citations resolve inside the repository: nothing points at a `shared/` folder that a clone does not
have, and every `docs/references.md [n]` / `docs/references.md#anchor` names an entry that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "docs" / "references.md"
SCANNED = ("src", "docs", "benchmarks", "tests")
SKIP_DIRS = {"__pycache__", ".pytest_cache"}

SHARED_PATH = re.compile(r"\bshared/")  # `shared/METHODS.md`, `/work/shared/x`; not `<shared>/` or `x_shared/`
# "docs/references.md [8]", "docs/references.md [8, 9]" and "[8] in docs/references.md", "[7] of docs/references.md"
CITE_AFTER = re.compile(r"docs/references\.md\)?\s*\[([^\]\n]+)\]")
CITE_BEFORE = re.compile(r"\[([^\]\n]+)\]\s+(?:in|of)\s+docs/references\.md")
ANCHOR = re.compile(r"docs/references\.md#([A-Za-z0-9_-]+)")
ENTRY = re.compile(r"^(?:#+\s*|\s*[-*]\s+\*\*)\[([^\]\n]+)\]", re.MULTILINE)  # "### [8] ..." or "- **[gptq]** ..."
HEADING = re.compile(r"^#+\s+(.+?)\s*$", re.MULTILINE)


def _text_files():
    """(path, text) of every text file under the scanned folders, plus README.md."""
    paths = [ROOT / "README.md"]
    for folder in SCANNED:
        paths += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file())
    for path in paths:
        if SKIP_DIRS & set(path.relative_to(ROOT).parts) or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # images, compiled files
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _keys(inside_brackets: str) -> list[str]:
    return [k.strip() for k in inside_brackets.split(",") if k.strip()]


def test_no_file_points_at_a_shared_folder():
    this = Path(__file__).resolve()
    hits = []
    for path, text in _text_files():
        if path.resolve() == this:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if SHARED_PATH.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not hits, "cite docs/references.md instead of a shared/ file a clone does not have:\n" + "\n".join(hits)


def test_references_lists_the_ten_systems_in_order():
    entries = ENTRY.findall(REFERENCES.read_text(encoding="utf-8"))
    numbered = [e for e in entries if e.isdigit()]
    assert numbered == [str(n) for n in range(1, 11)]
    assert len(entries) == len(set(entries)), "a reference key is defined twice"


def test_every_citation_of_references_md_resolves():
    doc = REFERENCES.read_text(encoding="utf-8")
    keys = set(ENTRY.findall(doc))
    anchors = {_slug(h) for h in HEADING.findall(doc)}
    missing, cited = [], 0
    this = Path(__file__).resolve()
    for path, text in _text_files():
        if path.resolve() in (REFERENCES.resolve(), this):
            continue  # the page itself and this test describe the citation forms
        for pattern in (CITE_AFTER, CITE_BEFORE):
            for match in pattern.finditer(text):
                for key in _keys(match.group(1)):
                    cited += 1
                    if key not in keys:
                        missing.append(f"{path.relative_to(ROOT)}: [{key}]")
        for match in ANCHOR.finditer(text):
            cited += 1
            if match.group(1) not in anchors:
                missing.append(f"{path.relative_to(ROOT)}: #{match.group(1)}")
    assert cited > 0, "no citation of docs/references.md found: the patterns no longer match the sources"
    assert not missing, "cited but not defined in docs/references.md:\n" + "\n".join(missing)


@pytest.mark.parametrize("line, keys", [
    ("EdgeDistill (docs/references.md [8]) prices", ["8"]),
    ("([4] in docs/references.md). The paper", ["4"]),
    ("Method [7] of docs/references.md (KD", ["7"]),
    ("see docs/references.md [8, 9]", ["8", "9"]),
])
def test_citation_patterns(line, keys):
    found = [k for p in (CITE_AFTER, CITE_BEFORE) for m in p.finditer(line) for k in _keys(m.group(1))]
    assert found == keys


def test_shared_path_pattern():
    assert SHARED_PATH.search("see shared/METHODS.md [8]")
    assert SHARED_PATH.search("read /work/shared/BENCHMARKS.md")
    assert not SHARED_PATH.search("cache as <shared>/cache/")
    assert not SHARED_PATH.search("teacher_cache_shared/x")
