"""The package's shape: folders follow the data flow, imports only go down, every name has one home.

Read from the source with ``ast`` (TYPE_CHECKING blocks and imports inside
functions included), so what is checked is what a reader sees, not what one
process happened to import.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import asyncflow

PACKAGE = Path(asyncflow.__file__).parent
MAX_MODULE_LINES = 400
# The runtime and the two shells over it: the domain folders never import them.
DOMAIN = ("reading", "writing", "delivery", "labels", "stats", "backends")
RUNTIME = ("pipeline", "cluster")
SHELLS = ("cli", "flame", "listen")
# The floors, lowest first: a module imports only from its own floor and those below.
SHARED_TYPES = (
    "_version",
    "errors",
    "enums",
    "machine",
    "log",
    "digests",
    "files",
    "artifact",
    "case",
    "result",
)
FLOORS = (
    ("shared types", lambda m: _top(m) in SHARED_TYPES),
    ("domain", lambda m: _folder(m) in DOMAIN),
    ("settings", lambda m: m == "asyncflow.settings"),
    ("runtime", lambda m: _folder(m) in RUNTIME),
    ("shells and the public face", lambda m: _folder(m) in SHELLS or _top(m) in ("", "__main__", "testing")),
)


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> Iterator[tuple[str, int, str | None]]:
    """(imported asyncflow module, line, the name taken from it or None) of every import."""
    path = MODULES[module]
    package = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield base, node.lineno, alias.name


def _edges(module: str) -> set[str]:
    """The asyncflow modules importing ``module`` runs: each one imported (a name that is a
    submodule counts as that module), and the package ``__init__`` above each that ``module``
    is not itself inside (Python runs it first)."""
    targets = set()
    for base, _, name in _imports(module):
        if not base.startswith("asyncflow"):
            continue
        targets.add(f"{base}.{name}" if f"{base}.{name}" in MODULES else base)
    edges = set()
    for target in targets:
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            ancestor = ".".join(parts[:depth])
            if ancestor in MODULES and not (module == ancestor or module.startswith(ancestor + ".")):
                edges.add(ancestor)
    edges.discard(module)
    return edges


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph = {module: _edges(module) for module in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and _is_package(module)) else None


def _top(module: str) -> str | None:
    """A top-level module's name (``""`` for the package root), None for a folder's."""
    parts = module.split(".")
    if module == "asyncflow":
        return ""
    return parts[1] if len(parts) == 2 and not _is_package(module) else None


def _floor(module: str) -> int:
    (floor,) = [number for number, (_, holds) in enumerate(FLOORS) if holds(module)]
    return floor


def test_every_module_stands_on_one_floor() -> None:
    unplaced = [m for m in MODULES if sum(bool(holds(m)) for _, holds in FLOORS) != 1]
    assert unplaced == [], "place each in FLOORS"


def test_no_import_runs_up_the_floors() -> None:
    """Shared types < domain folders < settings < runtime < shells: TYPE_CHECKING imports and
    imports inside functions count as well."""
    upward = [
        f"{module} ({FLOORS[_floor(module)][0]}) -> {target} ({FLOORS[_floor(target)][0]})"
        for module in MODULES
        for target in _edges(module)
        if target != "asyncflow" and _floor(target) > _floor(module)
    ]
    assert upward == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert _cycles() == []


def test_no_module_imports_the_package_root() -> None:
    upward = [
        f"{module}:{line}"
        for module in MODULES
        for base, line, name in _imports(module)
        if base == "asyncflow" and f"asyncflow.{name}" not in MODULES
    ]
    assert upward == []


@pytest.mark.parametrize(
    ("layer", "forbidden"), [(DOMAIN, (*RUNTIME, *SHELLS)), (RUNTIME, SHELLS)], ids=["domain", "runtime"]
)
def test_imports_go_down_from_the_shells_to_the_runtime_to_the_domain(
    layer: tuple[str, ...], forbidden: tuple[str, ...]
) -> None:
    upward = [
        f"{module} -> {target}"
        for module in MODULES
        if _folder(module) in layer
        for target in _edges(module)
        if _folder(target) in forbidden
    ]
    assert upward == []


def test_what_a_result_is_comes_without_the_orchestrator() -> None:
    """The CLI's summary, the demo and the Hub reporter read results without the pipeline."""
    seen, todo = set(), ["asyncflow.result", "asyncflow.flame.hub"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += [m for m in _edges(module) if m != "asyncflow"]
    assert not {m for m in seen if m.startswith("asyncflow.pipeline")}


def _defined(module: str) -> set[str]:
    """Names a module defines at its top level (in try/if blocks too); a package ``__init__``
    also defines what it imports from inside its own folder."""
    names: set[str] = set()
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node in tree.body:
            names.add(node.name)
    for statement in _top_level(tree.body):
        if isinstance(statement, ast.Assign):
            names |= {
                t.id for target in statement.targets for t in ast.walk(target) if isinstance(t, ast.Name)
            }
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            names.add(statement.target.id)
        elif isinstance(statement, ast.ImportFrom) and _is_package(module):
            base = statement.module or ""
            inside = module == "asyncflow" or base.startswith(module + ".")
            if inside and base.startswith("asyncflow"):
                names |= {alias.asname or alias.name for alias in statement.names}
    return names


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for statement in body:
        yield statement
        if isinstance(statement, ast.Try | ast.If):
            for block in (
                statement.body,
                getattr(statement, "orelse", []),
                getattr(statement, "finalbody", []),
            ):
                yield from _top_level(block)
            for handler in getattr(statement, "handlers", []):
                yield from _top_level(handler.body)


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"asyncflow.__main__"}))  # that one runs the CLI
def test_every_all_names_only_what_its_module_defines(module: str) -> None:
    """As anyio's test_all_attributes: ``__all__`` is a list, each name in it exists, and it is
    defined in the module (a package: in a module of its own folder), never re-exported."""
    loaded = importlib.import_module(module)
    exported = getattr(loaded, "__all__", None)
    assert isinstance(exported, list), f"{module} has no __all__ list"
    assert [name for name in exported if not hasattr(loaded, name)] == []
    assert sorted(set(exported) - _defined(module)) == []


def test_the_root_imports_each_public_name_from_its_home() -> None:
    for name in asyncflow.__all__:
        value = getattr(asyncflow, name)
        home = getattr(value, "__module__", None)
        if home is not None and home.startswith("asyncflow"):
            assert name in importlib.import_module(home).__all__, f"{name} is not public in {home}"


def test_no_module_over_400_lines() -> None:
    sizes = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in MODULES.items()}
    assert {module: lines for module, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


def test_each_folder_of_the_package_says_what_it_holds() -> None:
    """Every subpackage's docstring names each of its modules."""
    for package in [m for m in MODULES if _is_package(m) and m != "asyncflow"]:
        doc = importlib.import_module(package).__doc__ or ""
        inside = [m for m in MODULES if m.rpartition(".")[0] == package]
        missing = [m for m in inside if m.rpartition(".")[2] not in doc]
        assert missing == [], f"{package}'s docstring does not name {missing}"


def test_the_tests_mirror_the_package() -> None:
    """Each folder of tests/ is named after the package folder whose modules its tests hold."""
    tests = Path(__file__).parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders <= {_folder(m) for m in MODULES if _is_package(m) and m != "asyncflow"}
