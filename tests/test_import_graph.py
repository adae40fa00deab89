"""The import graph of src/cilkit, parsed: no import cycle anywhere, and each layer imports only
what docs/architecture.md's package table says it may.

Every import counts: module level, under ``if TYPE_CHECKING:``, inside a function (a lazy import
is still a dependency), relative or absolute, and ``importlib.import_module("cilkit...")`` with a
literal name. ``from cilkit.a import b`` is an edge to the module ``cilkit.a.b`` when ``b`` is
one, else to ``cilkit.a`` (its ``__init__``). The parent packages Python initialises before a
submodule are not edges: ``cilkit/__init__`` imports every method to fill the registries, so
counting it would put every module on one cycle and hide the real ones."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "cilkit"  # read, never imported: the graph is the source's
DOCS = ROOT / "docs" / "architecture.md"

# The layers of docs/architecture.md ("| where | what lives there | may import |"), first match
# wins. A module's layer is its sub-package (``data``, ``run``, ...), ``top`` for a module of
# the top level, ``root`` for cilkit/__init__. "may import": layers, or single modules; a layer
# always imports itself. "never": modules a row forbids although its layers would allow them.
BELOW_TRAINING = {"common", "settings", "cil", "data", "models"}
RULES: list[tuple[str, set[str], set[str]]] = [
    # where                     may import                                                  never
    ("cilkit.cli",              {"*"},                                                      set()),
    ("cilkit.__main__",         {"*"},                                                      set()),
    ("cilkit.describe",         {"*"},                                                      set()),  # cilkit info reads everything
    ("cilkit",                  {"common", "settings", "data", "models", "methods"},       set()),  # fills the registries
    ("common",                  set(),                                                      set()),
    ("settings",                {"common"},                                                 set()),
    ("cil",                     {"common", "settings"},                                     set()),
    ("data",                    {"common", "settings"},                                     set()),
    ("models",                  {"common", "settings"},                                     set()),
    # the hook protocol (Context, Batch, FitHooks, Method) stands below the engine and the runner
    ("cilkit.training.protocol", BELOW_TRAINING,                                            {"cilkit.training.engine"}),
    ("training",                BELOW_TRAINING,                                             set()),
    ("methods",                 BELOW_TRAINING | {"training"},                              set()),
    # the run directory's names and readers, below both the runner and the analysis
    ("rundir",                  {"common", "settings"},                                     set()),
    ("analysis",                {"common", "settings", "cil", "rundir"},                    set()),
    # one run
    ("run",                     BELOW_TRAINING | {"root", "training", "methods", "rundir", "cilkit.analysis.plots",
                                                  "cilkit.analysis.runsets"},               set()),
    # many runs: plans, executors, tuning; each run of a plan is one cilkit.run
    ("runs",                    {"common", "settings", "cil", "data", "run", "rundir",
                                 "cilkit.analysis.significance"},                           {"cilkit.training.engine"}),
]


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The cilkit modules a module's source imports, wherever the import statement sits."""
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: None if is_package else -1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            while target not in known and "." in target:  # cilkit.x.Name -> cilkit.x
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the cilkit modules it imports} for every module under ``src``."""
    paths = {_module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    return {m: _imported(ast.parse(p.read_text()), m, p.name == "__init__.py", set(paths)) for m, p in paths.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, successors = work[-1]
            for w in successors:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle inside a strongly connected component, as a -> b -> ... -> a."""
    inside = set(component)
    best: list[str] = []
    for start in component:
        previous: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                path = [v]
                while (p := previous[path[-1]]) is not None:
                    path.append(p)
                cycle = path[::-1] + [start]
                if not best or len(cycle) < len(best):
                    best = cycle
                break
            for w in sorted(graph[v] & inside):
                if w not in previous:
                    previous[w] = v
                    queue.append(w)
    return best


def cycles_text(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"{' -> '.join(shortest_cycle(graph, c))}   (cycle among {len(c)}: {', '.join(c)})"
                     for c in strongly_connected(graph))


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1] if (SRC / parts[1]).is_dir() else "top"


def rule(module: str) -> tuple[str, set[str], set[str]]:
    for where, allowed, never in RULES:
        if module == where or (not where.startswith("cilkit") and layer(module) == where):
            return where, allowed, never
    raise AssertionError(f"{module}: no row of RULES covers it (a new package needs its row here and in docs/architecture.md)")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    broken = []
    for module, imported in sorted(graph.items()):
        where, allowed, never = rule(module)
        for target in sorted(imported):
            ok = ("*" in allowed or layer(target) == layer(module) or layer(target) in allowed
                  or target in allowed) and target not in never
            if not ok:
                broken.append(f"{module} imports {target} (rule '{where}' allows {sorted(allowed)}, never {sorted(never)})")
    return broken


def test_there_is_no_import_cycle_between_modules():
    graph = import_graph()
    assert "cilkit.run.loop" in graph and graph["cilkit.run.loop"], "the parser found no imports at all"
    found = cycles_text(graph)
    print(found)
    assert not found, "import cycles:\n" + found


def test_there_is_no_import_cycle_between_packages():
    """A sub-package is one node (run/ and analysis/ importing each other, through different
    modules, is a cycle); a top-level module is its own node."""
    graph: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        node = module if layer(module) in ("top", "root") else f"cilkit.{layer(module)}"
        graph.setdefault(node, set()).update(
            t if layer(t) in ("top", "root") else f"cilkit.{layer(t)}" for t in imported)
    graph = {n: deps - {n} for n, deps in graph.items()}
    found = cycles_text(graph)
    print(found)
    assert not found, "import cycles between packages:\n" + found


def test_each_layer_imports_only_what_docs_architecture_allows():
    broken = layer_violations(import_graph())
    print("\n".join(broken))
    assert not broken


def test_every_package_has_its_row_in_the_rules_and_in_docs_architecture():
    table = DOCS.read_text()
    for package in sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()):
        assert any(where == package for where, _, _ in RULES), package
        assert f"| `cilkit/{package}/` |" in table, f"docs/architecture.md's package table lacks cilkit/{package}/"


def test_the_graph_sees_lazy_type_checking_and_relative_imports_and_catches_a_forbidden_one(tmp_path):
    """The checks above fail on what they are meant to find: a fake package whose analysis
    module imports the runner inside a function, and a cycle closed only under TYPE_CHECKING
    and by a relative import."""
    fake = tmp_path / "cilkit"
    for rel, text in {
        "__init__.py": "",
        "common/__init__.py": "",
        "common/errors.py": "",
        "training/__init__.py": "",
        "training/engine.py": "",
        "analysis/__init__.py": "",
        "analysis/report.py": "from cilkit.common import errors\ndef f():\n    import cilkit.run.loop\n",
        "run/__init__.py": "",
        "run/loop.py": ("from typing import TYPE_CHECKING\nfrom . import store\nif TYPE_CHECKING:\n"
                        "    from cilkit.training.engine import Engine\n"),
        "run/store.py": "import importlib\ndef g():\n    importlib.import_module('cilkit.run.loop')\n",
    }.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    graph = import_graph(fake)
    assert graph["cilkit.analysis.report"] == {"cilkit.common.errors", "cilkit.run.loop"}
    assert graph["cilkit.run.loop"] == {"cilkit.run.store", "cilkit.training.engine"}
    assert strongly_connected(graph) == [["cilkit.run.loop", "cilkit.run.store"]]
    assert shortest_cycle(graph, ["cilkit.run.loop", "cilkit.run.store"]) == \
        ["cilkit.run.loop", "cilkit.run.store", "cilkit.run.loop"]
    assert any(v.startswith("cilkit.analysis.report imports cilkit.run.loop") for v in layer_violations(graph))


@pytest.mark.parametrize("module, target, allowed", [
    ("cilkit.analysis.report", "cilkit.methods.lwf", False),
    ("cilkit.analysis.report", "cilkit.training.engine", False),
    ("cilkit.analysis.report", "cilkit.models.heads", False),
    ("cilkit.analysis.report", "cilkit.run.loop", False),
    ("cilkit.analysis.report", "cilkit.rundir.layout", True),
    ("cilkit.training.protocol", "cilkit.training.engine", False),
    ("cilkit.training.protocol", "cilkit.run.loop", False),
    ("cilkit.training.protocol", "cilkit.methods.lwf", False),
    ("cilkit.training.protocol", "cilkit.models", True),
    ("cilkit.training.engine", "cilkit.methods.base", False),
    ("cilkit.methods.lwf", "cilkit.run.store", False),
    ("cilkit.rundir.layout", "cilkit.run.store", False),
    ("cilkit.run.tensorboard", "cilkit.analysis.plots", True),
    ("cilkit.run.loop", "cilkit.runs.jobs", False),
    ("cilkit.runs.jobs", "cilkit.run.loop", True),
    ("cilkit.runs.jobs", "cilkit.methods.lwf", False),
    ("cilkit.data.base", "cilkit.models.heads", False),
])
def test_the_rules_table_says_what_docs_architecture_says(module, target, allowed):
    assert (not layer_violations({module: {target}})) == allowed
