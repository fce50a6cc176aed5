"""The import contract of `quantplan`, read from the source with `ast` (nothing is imported).

Three rules, checked on every module under quantplan/:

1. Direction. Each module belongs to a layer: its subpackage (`quant`, `workers`, `search`, `storage`,
   `service`) or, for a top-level module, its own name (`errors`, `settings`, `net`, `progress`;
   `quantplan/__init__.py` is `root`). A module imports its own layer and the layers `LAYERS` lists for it,
   nothing else: quant <- workers, quant <- search, storage independent of quant/workers/search, service on top.
   Every import counts here, inside functions and `if TYPE_CHECKING:` blocks too: a deferred import is still a
   dependency.
2. No cycles: module A imports B and B, directly or through others, imports A. Every import that can run
   counts, inside functions too (an import deferred into a function hides a cycle, it does not remove it;
   deferring a heavy import such as Ray is fine as long as no cycle closes); only `if TYPE_CHECKING:` blocks
   are left out, since they never run. Importing a name from a package is an edge to the package's
   `__init__`; importing a submodule (`from quantplan.search import knapsack`) is an edge to the submodule.
3. No private names. `from x import _y`, `x._y` on an imported quantplan module, and `import pkg._mod` from
   outside `pkg` fail: a leading underscore means the name belongs to its module (a private module `_mod.py`
   to its package).

`import_violations(root)` checks any tree with a `quantplan/` directory, so the tests below also run it on
small synthetic trees and show that each rule fails when broken.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "quantplan"

# layer -> the other layers it may import (its own layer is always allowed)
LAYERS: dict[str, frozenset[str]] = {
    "root": frozenset(),  # quantplan/__init__.py
    "errors": frozenset(),  # the QuantPlanError hierarchy
    "net": frozenset(),  # host:port reachability without Ray (the API's health check, the Ray driver)
    "settings": frozenset({"errors"}),  # project settings and database-URL helpers (storage, search, service)
    "progress": frozenset(),  # counted steps -> progress events -> listeners (rich bars, the job record)
    "quant": frozenset({"errors", "progress"}),
    "workers": frozenset({"quant", "errors", "net", "settings", "progress"}),
    "search": frozenset({"quant", "errors", "settings", "progress"}),
    "storage": frozenset({"errors", "settings"}),
    "service": frozenset({"root", "errors", "net", "settings", "progress", "quant", "workers", "search",
                          "storage"}),
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a submodule, or the module a name is taken from)
    name: str | None  # the name taken by `from target import name`, else None
    line: int
    type_only: bool  # inside an `if TYPE_CHECKING:` block: never runs


def module_names(root: Path) -> dict[str, Path]:
    """Every module under root/quantplan, by dotted name (`quantplan.search` for its `__init__.py`)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    name = "root" if len(parts) == 1 else parts[1]
    return name if name in LAYERS else None


def imports(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """The quantplan imports of one module, each with whether it sits in an `if TYPE_CHECKING:` block."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node, type_only in _walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield Import(module, alias.name, None, node.lineno, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    yield Import(module, sub, None, node.lineno, type_only)
                else:
                    yield Import(module, base, alias.name, node.lineno, type_only)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _walk(node: ast.AST, type_only: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below `node`, with whether it is inside an `if TYPE_CHECKING:` block (not its `else`)."""
    for child in ast.iter_child_nodes(node):
        yield child, type_only
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, type_only
                yield from _walk(stmt, type_only)
        else:
            yield from _walk(child, type_only)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def direction_violations(edges: list[Import]) -> list[str]:
    out = []
    for e in edges:
        src, dst = layer(e.source), layer(e.target)
        if src is None:
            out.append(f"{e.source} is in no layer of LAYERS; add its layer and what it may import")
        elif dst is not None and dst != src and dst not in LAYERS[src]:
            out.append(f"{e.source}:{e.line} imports {e.target}: layer {src!r} may not import {dst!r}")
    return out


def cycles(edges: list[Import]) -> list[str]:
    """One cycle per strongly connected component of the runtime import graph (Tarjan, then a shortest loop)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.type_only and e.target != e.source:
            graph.setdefault(e.source, set()).add(e.target)
    out = []
    for component in _components(graph):
        start = min(component)
        out.append("import cycle: " + " -> ".join(_cycle_path(graph, component, start)))
    return out


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_path(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is not on a cycle")


def private_violations(edges: list[Import], modules: dict[str, Path]) -> list[str]:
    out = []
    for e in edges:
        if e.name is not None and _private(e.name):
            out.append(f"{e.source}:{e.line} imports private name {e.name} from {e.target}")
        owner, _, last = e.target.rpartition(".")
        if e.name is None and _private(last) and not (e.source + ".").startswith(owner + "."):
            out.append(f"{e.source}:{e.line} imports private module {e.target} from outside {owner}")
    for module, path in modules.items():
        out += _private_attributes(module, path, modules)
    return out


def _private_attributes(module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """`mod._name` where `mod` is bound by an import to another quantplan module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> dotted module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value)
            head, _, rest = (dotted or "").partition(".")
            target = ".".join(p for p in (bound.get(head), rest) if p) if head in bound else None
            if target in modules and target != module:
                out.append(f"{module}:{node.lineno} uses private name {node.attr} of {target}")
    return out


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def import_edges(root: Path) -> tuple[list[Import], dict[str, Path]]:
    modules = module_names(root)
    return [e for m, p in modules.items() for e in imports(m, p, modules)], modules


def import_violations(root: Path) -> list[str]:
    """Everything under root/quantplan that breaks the direction, cycle or private-name rule (module doc)."""
    edges, modules = import_edges(root)
    return sorted(set(direction_violations(edges))) + cycles(edges) + sorted(set(private_violations(edges, modules)))


# --------------------------------------------------------------------------------------------- the real tree


def test_every_import_follows_the_layer_direction() -> None:
    edges, modules = import_edges(REPO)
    assert len(modules) > 50 and {layer(m) for m in modules} >= {"quant", "workers", "search", "storage", "service"}
    assert direction_violations(edges) == []


def test_no_import_cycles() -> None:
    assert cycles(import_edges(REPO)[0]) == []


def test_no_module_imports_another_modules_private_names() -> None:
    edges, modules = import_edges(REPO)
    assert private_violations(edges, modules) == []


# ----------------------------------------------------------------------- the checker fails when it should


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """A fake quantplan package: every directory gets an `__init__.py`, each file its dedented source."""
    for name, source in {"__init__.py": "", "errors.py": "class QuantPlanError(Exception): ...\n", **files}.items():
        path = root / PACKAGE / name
        for parent in [p for p in path.relative_to(root).parents if p != Path(".")]:
            (root / parent).mkdir(parents=True, exist_ok=True)
            (root / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return root


LEGAL = {
    "quant/schemes.py": "from quantplan.errors import QuantPlanError\ndef parse(s): ...\n",
    "quant/plan.py": "from .schemes import parse\n",
    "storage/db.py": "from quantplan.errors import QuantPlanError\nfrom quantplan.settings import normalize_url\n",
    "settings.py": "from quantplan.errors import QuantPlanError\ndef normalize_url(u): ...\n",
    "search/space.py": "from quantplan.quant import schemes\nx = schemes.parse\n",
    "search/study.py": "from quantplan.settings import normalize_url\nfrom quantplan.search import space\n",
    "workers/tasks.py": "import quantplan.quant.plan\n",
    "service/cli.py": """\
        import quantplan.storage.db as db
        from quantplan.search import study
        from quantplan.workers.tasks import *
        """,
}


def test_a_legal_tree_passes(tmp_path: Path) -> None:
    assert import_violations(write_tree(tmp_path, LEGAL)) == []


def test_an_inverted_import_fails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "quant/schemes.py": "from quantplan.storage.db import QuantPlanError\n"})
    assert import_violations(root) == [
        "quantplan.quant.schemes:1 imports quantplan.storage.db: layer 'quant' may not import 'storage'"]


def test_a_deferred_or_relative_inverted_import_fails_too(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "search/study.py": """\
        from typing import TYPE_CHECKING
        from ..storage import db
        if TYPE_CHECKING:
            from quantplan.workers.tasks import run
        def f():
            import quantplan.service
        """})
    assert import_violations(root) == [
        "quantplan.search.study:2 imports quantplan.storage.db: layer 'search' may not import 'storage'",
        "quantplan.search.study:4 imports quantplan.workers.tasks: layer 'search' may not import 'workers'",
        "quantplan.search.study:6 imports quantplan.service: layer 'search' may not import 'service'",
    ]


def test_the_top_level_modules_import_no_subpackage(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "__init__.py": "from quantplan import quant\n",
                                 "errors.py": "import quantplan.workers\n"})
    assert import_violations(root) == [
        "quantplan.errors:1 imports quantplan.workers: layer 'errors' may not import 'workers'",
        "quantplan:1 imports quantplan.quant: layer 'root' may not import 'quant'",
    ]


def test_a_module_outside_every_layer_fails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "pipeline/stages.py": "from quantplan.quant import plan\n"})
    assert import_violations(root) == [
        "quantplan.pipeline.stages is in no layer of LAYERS; add its layer and what it may import"]


def test_an_import_cycle_fails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "workers/pipeline.py": "from quantplan.workers.tasks import run\n",
                                 "workers/evaluate.py": "from quantplan.workers import pipeline\n",
                                 "workers/tasks.py": "from quantplan.workers.evaluate import x\n"})
    assert import_violations(root) == [
        "import cycle: quantplan.workers.evaluate -> quantplan.workers.pipeline -> quantplan.workers.tasks"
        " -> quantplan.workers.evaluate"]


def test_a_cycle_closed_inside_a_function_fails_and_one_closed_by_type_checking_does_not(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "workers/pipeline.py": "from quantplan.workers.tasks import run\n",
                                 "workers/tasks.py": """\
        import typing
        if typing.TYPE_CHECKING:
            from quantplan.workers.pipeline import Stage
        else:
            import quantplan.quant.plan
        """})
    assert import_violations(root) == []
    (root / PACKAGE / "workers" / "tasks.py").write_text("def run():\n    from quantplan.workers import pipeline\n")
    assert import_violations(root) == [
        "import cycle: quantplan.workers.pipeline -> quantplan.workers.tasks -> quantplan.workers.pipeline"]


def test_a_private_import_fails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "search/space.py": """\
        from quantplan.quant.schemes import _parse, __version__
        from quantplan.quant import schemes, plan as p
        import quantplan.quant.plan
        schemes._cache.clear()
        p._resolve()
        quantplan.quant.plan._x
        schemes.__doc__
        """})
    assert import_violations(root) == [
        "quantplan.search.space:1 imports private name _parse from quantplan.quant.schemes",
        "quantplan.search.space:4 uses private name _cache of quantplan.quant.schemes",
        "quantplan.search.space:5 uses private name _resolve of quantplan.quant.plan",
        "quantplan.search.space:6 uses private name _x of quantplan.quant.plan",
    ]


def test_a_private_module_is_private_to_its_package(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {**LEGAL, "quant/_impl.py": "", "quant/plan.py": "from quantplan.quant import _impl\n",
                                 "search/space.py": "import quantplan.quant._impl\n"})
    assert import_violations(root) == [
        "quantplan.search.space:1 imports private module quantplan.quant._impl from outside quantplan.quant"]
