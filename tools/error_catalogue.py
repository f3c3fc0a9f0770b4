"""Write the catalogue of every user-facing error into docs/troubleshooting.md.

Every mistake a user can make ends in one `edgestill: error: ...` line, raised as an EdgestillError whose
message names the problem and the fix. This script reads the source (ast, nothing is imported), finds
every `EdgestillError(...)` and writes its message as a template between the catalogue markers of
docs/troubleshooting.md, grouped by module: `<expr>` marks a part filled in at run time. The test
tests/test_troubleshooting.py fails when the page is stale.

    python tools/error_catalogue.py          # rewrite the catalogue in docs/troubleshooting.md
    python tools/error_catalogue.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "edgestill"
PAGE = ROOT / "docs" / "troubleshooting.md"
BEGIN, END = "<!-- errors:begin -->", "<!-- errors:end -->"


def _render(node: ast.AST) -> str:
    """The message an expression builds, with run-time parts as <expr>."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_render(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return f"<{ast.unparse(node.value)}>"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _render(node.left) + _render(node.right)
    return f"<{ast.unparse(node)}>"


def _messages(path: Path) -> list[tuple[str, str]]:
    """[(enclosing function, message template)] for each EdgestillError(...) in `path`, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == "EdgestillError"
                    and child.args):
                found.append((inner or "(module)", " ".join(_render(child.args[0]).split())))
            visit(child, inner)

    visit(tree, "")
    return found


def catalogue() -> str:
    """The Markdown between the markers: one table per module that raises user errors."""
    parts = []
    for path in sorted(SOURCE.rglob("*.py")):
        rows = _messages(path)
        if not rows:
            continue
        module = ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts)
        parts += [f"### `{module}`", "", "| where | message |", "|---|---|"]
        for where, message in rows:
            text = message.replace("|", "\\|").replace("`", "'")
            parts.append(f"| `{where}` | {text} |")
        parts.append("")
    return "\n".join(parts)


def updated_page(page: str) -> str:
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE} lacks the markers {BEGIN} ... {END}")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{catalogue()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/troubleshooting.md is stale")
    args = ap.parse_args(argv)
    page = PAGE.read_text(encoding="utf-8")
    new = updated_page(page)
    if args.check:
        if new != page:
            print(f"{PAGE} is stale: run python tools/error_catalogue.py", file=sys.stderr)
            return 1
        return 0
    if new != page:
        tmp = PAGE.with_name(PAGE.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(PAGE)
    print(f"{PAGE}: {new.count(chr(10) + '| `')} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
