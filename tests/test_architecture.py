"""The import contract of src/edgestill, read from the source with `ast` (nothing is imported).

Every `import edgestill...` and `from edgestill... import ...` counts, at module level and inside functions
alike (a lazy import is still a dependency), and so does `importlib.import_module("edgestill...")`. Only an
import under `if TYPE_CHECKING:` is left out: it is never executed, it names a type for an annotation.

The layering. A part may import itself and the parts in its row, nothing else. Each row lists only rows
above it, so nothing reaches back up and there is no cycle:

    part       may import                                            what lives there
    ---------  ----------------------------------------------------  -----------------------------------------
    core       core                                                  errors.py, files.py, runs.py, progress.py
                                                                     (and edgestill/__init__.py)
    data       core                                                  corpora, labelled sets, text checks
    models     core, data                                            loading, saving and checking models
                                                                     (GGUF too), slicing, low-rank, encoders
    quant      core                                                  formats, fake quantization, GPTQ
    runtime    core, data, models                                    what RUNS artifacts: llama.cpp
                                                                     (llama-cpp-python), onnxruntime
    evaluate   core, data, models, runtime                           metrics, parity, speed, reports
    distill    core, data, models, quant, evaluate                   training a student
    export     core, data, models, quant, runtime, evaluate          what WRITES artifacts: GGUF, ONNX
    plan       core, data, models, quant, runtime, evaluate, export  device profiles, cost model, allocation
    serve      core, data, models, runtime, plan                     the HTTP server, its engine and scheduler
    audit      core, models                                          planted triggers, the trigger scan, ASR
    federated  core, data, models, evaluate, distill                 federated two-way KD on Flower, aggregation
    config     core and every package above                          config.py: the recipe schema, which
                                                                     reuses the packages' configs/registries
    jobs       all of the above, jobs                                one recipe per command
    cli        all of the above, jobs                                cli.py: argument parsing

So core imports no package; no package imports config.py (the schema sits on top of the library), a job
or the CLI.

Also checked here:
- no cycle between parts, and none between modules (within a package too);
- no module uses another module's private name (`from x import _name`, or `x._name` on an imported
  module); tests may still import privates;
- no function in edgestill/jobs/* or cli.py is longer than 80 lines (a job is a short recipe).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "edgestill"

CORE = ("errors", "files", "runs", "progress")
PACKAGES = ("data", "models", "quant", "runtime", "evaluate", "distill", "export", "plan", "serve", "audit", "federated")
_EVERYTHING = ("core", *PACKAGES, "config", "jobs")
MAY_IMPORT = {
    "core": {"core"},
    "data": {"core"},
    "models": {"core", "data"},
    "quant": {"core"},
    "runtime": {"core", "data", "models"},
    "evaluate": {"core", "data", "models", "runtime"},
    "distill": {"core", "data", "models", "quant", "evaluate"},
    "export": {"core", "data", "models", "quant", "runtime", "evaluate"},
    "plan": {"core", "data", "models", "quant", "runtime", "evaluate", "export"},
    "serve": {"core", "data", "models", "runtime", "plan"},
    "audit": {"core", "models"},
    "federated": {"core", "data", "models", "evaluate", "distill"},
    "config": {"core", *PACKAGES},
    "jobs": set(_EVERYTHING),
    "cli": set(_EVERYTHING),
}
MAX_JOB_FUNCTION_LINES = 80


# --- reading the source ------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> str:
    """'core', a package name, 'config', 'jobs' or 'cli'."""
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in CORE):
        return "core"
    return parts[1] if parts[1] in (*PACKAGES, "config", "jobs", "cli") else f"unknown ({module})"


def _package_of(module: str) -> str:
    """The package a module's relative imports start from."""
    return module if MODULES.get(module, Path()).name == "__init__.py" else module.rpartition(".")[0]


def _import_module_target(call: ast.Call) -> str | None:
    """`importlib.import_module("edgestill.x")` / f"edgestill.x.{name}" -> "edgestill.x"."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)  # f"edgestill.plan.{name}" -> the package edgestill.plan at least
        return prefix[:-1] if prefix.endswith(".") else prefix.rpartition(".")[0] or None
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def executed_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks (their `else:` counts)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _is_type_checking(node):
            todo.extend(reversed(node.orelse))
            todo.append(node.test)
        else:
            todo.extend(reversed(list(ast.iter_child_nodes(node))))


class Imports:
    """One module's edgestill imports: (target module, name or None, line), and names bound to modules."""

    def __init__(self, module: str, source: str | None = None):
        self.module = module
        if source is None:
            source = MODULES[module].read_text(encoding="utf-8")
        self.tree = ast.parse(source, filename=str(MODULES.get(module, module)))
        self.edges: list[tuple[str, str | None, int]] = []
        self.module_aliases: set[str] = set()
        for node in executed_nodes(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "edgestill":
                        self.edges.append((alias.name, None, node.lineno))
                        if alias.asname:
                            self.module_aliases.add(alias.asname)
            elif isinstance(node, ast.ImportFrom):
                base = self._resolve(node)
                if base is None or base.split(".")[0] != "edgestill":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:  # `from edgestill.plan import hostbench`: the submodule itself
                        self.edges.append((sub, None, node.lineno))
                        self.module_aliases.add(alias.asname or alias.name)
                    else:
                        self.edges.append((base, alias.name, node.lineno))
            elif isinstance(node, ast.Call):
                target = _import_module_target(node)
                if target and target.split(".")[0] == "edgestill":
                    self.edges.append((target, None, node.lineno))

    def _resolve(self, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        package = _package_of(self.module).split(".")
        base = package[: len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))


IMPORTS = {m: Imports(m) for m in MODULES}


def _existing(target: str) -> str:
    """The module an import lands in (an attribute path falls back to its module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _module_graph() -> dict[str, dict[str, list[int]]]:
    graph: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for module, imports in IMPORTS.items():
        for target, _, line in imports.edges:
            target = _existing(target)
            if target and target != module:
                graph[module][target].append(line)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(SRC.parent)}:{line}"


# --- the contract ------------------------------------------------------------------------------------

def test_every_module_is_in_a_layer():
    unknown = sorted(m for m in MODULES if layer(m) not in MAY_IMPORT)
    assert not unknown, f"modules outside the layering table (add them to it): {unknown}"


def test_the_layering_table_has_no_cycle():
    graph = {a: {b for b in allowed if b != a} for a, allowed in MAY_IMPORT.items()}
    assert not _cycles(graph)


def test_the_docstring_table_is_the_one_checked():
    order = ("core", *PACKAGES)
    for part in order:
        allowed = ", ".join(p for p in order if p in MAY_IMPORT[part])
        row = f"\n    {part:<10} {allowed:<53} "
        assert row in __doc__, f"the docstring's row for {part} should say it may import {allowed}"


def test_packages_import_only_what_the_layering_allows():
    wrong = []
    for module, targets in _module_graph().items():
        for target, lines in targets.items():
            src, dst = layer(module), layer(target)
            if src != dst and dst not in MAY_IMPORT[src]:
                wrong.append(f"{_where(module, lines[0])}: {src} -> {dst} ({target})")
    assert not wrong, "imports against the layering (see this file's docstring):\n" + "\n".join(sorted(wrong))


def test_no_package_imports_a_job_or_the_cli():
    top = ("jobs", "cli")
    wrong = [f"{_where(m, lines[0])}: imports {t}" for m, targets in _module_graph().items()
             for t, lines in targets.items() if layer(m) not in top and layer(t) in top]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in _module_graph().items():
        for target in targets:
            if layer(module) != layer(target):
                graph[layer(module)].add(layer(target))
    assert not _cycles(graph), f"package cycles: {_cycles(graph)}"


def test_no_cycle_between_modules():
    graph = {m: set(targets) for m, targets in _module_graph().items()}
    cycles = _cycles(graph)
    detail = [f"{a} -> {b} ({_where(a, lines[0])})" for cycle in cycles for a in cycle
              for b, lines in _module_graph()[a].items() if b in cycle]
    assert not cycles, f"module cycles: {cycles}\n" + "\n".join(detail)


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    wrong = []
    for module, imports in IMPORTS.items():
        for target, name, line in imports.edges:
            private = _private(name) or any(_private(part) for part in target.split("."))
            if private and _existing(target) != module:
                wrong.append(f"{_where(module, line)}: from {target} import {name}")
        for node in ast.walk(imports.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imports.module_aliases and _private(node.attr)):
                wrong.append(f"{_where(module, node.lineno)}: {node.value.id}.{node.attr}")
    assert not wrong, "private names used across modules (make them public where they belong):\n" + "\n".join(
        wrong)


def test_job_and_cli_functions_are_short():
    long = []
    for module, imports in IMPORTS.items():
        if layer(module) not in ("jobs", "cli"):
            continue
        for node in ast.walk(imports.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > MAX_JOB_FUNCTION_LINES:
                    long.append(f"{_where(module, node.lineno)}: {node.name} has {lines} lines")
    assert not long, f"job/cli functions over {MAX_JOB_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    """The reader counts imports inside functions, resolves relative imports and `from pkg import submodule`,
    reads import_module's module, and leaves out only `if TYPE_CHECKING:` blocks."""
    source = ("from typing import TYPE_CHECKING\n"
              "from edgestill.plan import hostbench\n"
              "from . import cost\n"
              "if TYPE_CHECKING:\n    from edgestill.config import ShrinkConfig\n"
              "else:\n    from edgestill.quant.formats import Format\n"
              "def f():\n    from ..export.gguf import _x\n    import edgestill.runtime.llamacpp\n"
              "    return hostbench._solve, importlib.import_module(f'edgestill.data.{f}')\n")
    imports = Imports("edgestill.plan.allocate", source)
    assert [(target, name) for target, name, _ in imports.edges] == [
        ("edgestill.plan.hostbench", None), ("edgestill.plan.cost", None),
        ("edgestill.quant.formats", "Format"), ("edgestill.export.gguf", "_x"),
        ("edgestill.runtime.llamacpp", None), ("edgestill.data", None)]
    assert imports.module_aliases == {"hostbench", "cost"}
    assert layer("edgestill") == layer("edgestill.errors") == "core" and layer("edgestill.config") == "config"
    assert layer("edgestill.plan.cost") == "plan" and layer("edgestill.cli") == "cli"
