"""The layering of DESIGN.md section 1, read from the source with ``ast``.

Every import statement of ``zo/``, ``estimators/`` and ``tasks/`` counts, at module level or
inside a function, absolute or relative; only ``if TYPE_CHECKING:`` blocks are skipped (they
never run). The rules:

- no import circle;
- ``tasks`` imports nothing of ours but ``zo.registry`` (the one registry form, a leaf module
  that imports nothing of ours); ``estimators`` import the ``zo`` core only (not
  ``zo.train``, ``zo.commands``, ``tasks``); ``zo`` core modules import no estimator and no
  task (only ``zo.train``, ``zo.commands`` and ``zo.integrations`` compose them);
- no non-test source file over 600 lines;
- ``import zo`` loads no transformers.

The KNOWN_* sets hold today's offenders; an entry that no longer offends fails too, so the
sets only shrink.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("zo", "estimators", "tasks")
MAX_LINES = 600

COMPOSERS = ("zo.train", "zo.replay", "zo.tune", "zo.commands", "zo.integrations")
"""The zo modules (and packages) that may import estimators and tasks."""

KNOWN_VIOLATIONS: set[str] = set()
"""zo core modules that import estimators or tasks today."""

KNOWN_CIRCLES: set[frozenset[str]] = set()
"""Import circles today, by their modules."""

KNOWN_LONG_FILES: set[str] = set()
"""Source files over MAX_LINES lines today (to be split by idea)."""


@dataclass(frozen=True)
class Import:
    source: str
    """The importing module."""
    target: str
    """The imported module of ours."""
    where: str
    """``path:line: statement``, for messages."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _ours(name: str) -> str | None:
    """The module of ours that importing ``name`` runs (the longest known prefix)."""
    modules = _modules()
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        origin = ".".join([*base, *([node.module] if node.module else [])])
    else:
        origin = node.module or ""
    # `from pkg import sub` imports the submodule pkg.sub when there is one
    submodules = [f"{origin}.{alias.name}" for alias in node.names]
    named = [name for name in submodules if name in _modules()]
    return named or [origin]


@functools.cache
def _imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for module, path in _modules().items():
        text = path.read_text()
        lines = text.splitlines()
        for node in _import_nodes(ast.parse(text, filename=str(path))):
            statement = " ".join(line.strip() for line in lines[node.lineno - 1 : node.end_lineno])
            where = f"{path.relative_to(ROOT)}:{node.lineno}: {statement}"
            for name in _targets(node, module, path.name == "__init__.py"):
                target = _ours(name)
                if target is not None and target != module:
                    found.append(Import(module, target, where))
    return tuple(found)


def _in(module: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _report(bad: list[Import]) -> str:
    return "\n".join(f"  {i.source} imports {i.target}  ({i.where})" for i in bad)


# --- circles ----------------------------------------------------------------------------------


def _circles(edges: dict[str, set[str]]) -> list[tuple[frozenset[str], list[str]]]:
    """Each strongly connected component of more than one module (Tarjan), with one cycle
    through it (a shortest path from its first module back to itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while node not in component:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
            if len(component) > 1:
                components.append(frozenset(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for node in sorted(edges):
        if node not in index:
            connect(node)
    return [(members, _cycle_through(edges, members)) for members in components]


def _cycle_through(edges: dict[str, set[str]], members: frozenset[str]) -> list[str]:
    start = min(members)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(edges[node] & members):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"{sorted(members)} is not a strongly connected component")


def test_no_import_circles() -> None:
    edges: dict[str, set[str]] = {}
    for imp in _imports():
        edges.setdefault(imp.source, set()).add(imp.target)
        edges.setdefault(imp.target, set())
    found = _circles(edges)
    new = [(members, cycle) for members, cycle in found if members not in KNOWN_CIRCLES]
    if new:
        where = {(i.source, i.target): i.where for i in _imports()}
        report = [
            f"{' -> '.join(cycle)}  (modules in the circle: {sorted(members)})\n"
            + "\n".join(f"    {where[(a, b)]}" for a, b in zip(cycle, cycle[1:], strict=False))
            for members, cycle in new
        ]
        raise AssertionError("import circles:\n" + "\n".join(report))
    fixed = [sorted(known) for known in KNOWN_CIRCLES - {members for members, _ in found}]
    assert not fixed, f"no longer circles, remove them from KNOWN_CIRCLES: {fixed}"


def test_the_circle_finder_finds_what_it_should() -> None:
    # the checker itself: a three-module circle, a two-module one, and a clean chain
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "f"}, "f": set()}
    assert sorted(cycle for _, cycle in _circles(edges)) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert {members for members, _ in _circles(edges)} == {frozenset("abc"), frozenset("de")}
    assert _circles({"a": {"b"}, "b": set()}) == []


# --- layers -----------------------------------------------------------------------------------


def _core_violations() -> dict[str, list[Import]]:
    found: dict[str, list[Import]] = {}
    for imp in _imports():
        if (
            _in(imp.source, ("zo",))
            and not _in(imp.source, COMPOSERS)
            and _in(imp.target, ("estimators", "tasks"))
        ):
            found.setdefault(imp.source, []).append(imp)
    return found


def test_zo_core_imports_no_estimator_and_no_task() -> None:
    found = _core_violations()
    new = [imp for module in sorted(set(found) - KNOWN_VIOLATIONS) for imp in found[module]]
    assert not new, (
        "zo core modules import estimators or tasks (only zo.train, zo.replay, zo.tune, zo.commands and "
        "zo.integrations compose them):\n" + _report(new)
    )
    fixed = sorted(KNOWN_VIOLATIONS - set(found))
    assert not fixed, f"no longer violations, remove them from KNOWN_VIOLATIONS: {fixed}"


TASKS_MAY_IMPORT = ("zo.registry",)
"""The modules of ours that ``tasks`` may import (leaves: they import nothing of ours)."""


def test_tasks_import_only_the_registry_form() -> None:
    bad = [
        i
        for i in _imports()
        if _in(i.source, ("tasks",))
        and _in(i.target, ("zo", "estimators"))
        and i.target not in TASKS_MAY_IMPORT
    ]
    assert not bad, f"tasks imports nothing of ours but {TASKS_MAY_IMPORT}:\n" + _report(bad)
    # what tasks may import must stay a leaf, or tasks would import more through it
    deeper = [i for i in _imports() if i.source in TASKS_MAY_IMPORT]
    assert not deeper, f"{TASKS_MAY_IMPORT} must import nothing of ours:\n" + _report(deeper)


def test_estimators_import_the_zo_core_only() -> None:
    bad = [
        i
        for i in _imports()
        if _in(i.source, ("estimators",)) and _in(i.target, ("tasks", "zo.train", "zo.commands"))
    ]
    assert not bad, "estimators import the zo core only:\n" + _report(bad)


def test_the_import_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    # the checker itself, on this repository's own files: a function-level import
    # (zo.trainable's lazy peft import is not ours; zo.quant imports zo.models in a function),
    # a module-level one, and `from package import submodule`
    pairs = {(i.source, i.target) for i in _imports()}
    assert ("zo.quant", "zo.models") in pairs  # inside load_quantized
    assert ("zo.trainable", "zo.config") in pairs  # module level
    assert ("zo.train", "zo.models") in pairs  # from zo import models
    assert ("zo.models.tiny", "zo.models.registry") in pairs
    assert not any(i.target == "zo.models.tiny" for i in _imports() if "TYPE_CHECKING" in i.where)
    # a relative import resolves against the importing module's package
    tree = ast.parse("from . import registry\nfrom .hub import is_hub_id\nfrom .. import engine")
    targets = [_targets(node, "zo.models.loading", False) for node in _import_nodes(tree)]
    assert targets == [["zo.models.registry"], ["zo.models.hub"], ["zo.engine"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import zo.train\n")
    assert [type(n).__name__ for n in _import_nodes(tree)] == ["ImportFrom"]


# --- sizes and weight -------------------------------------------------------------------------


def test_no_source_file_over_600_lines() -> None:
    sources = [
        path
        for path in sorted(ROOT.rglob("*.py"))
        if not path.relative_to(ROOT).parts[0].startswith((".", "tests", "build", "dist"))
    ]
    long = {
        str(path.relative_to(ROOT)): n
        for path in sources
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    new = {path: n for path, n in long.items() if path not in KNOWN_LONG_FILES}
    assert not new, f"source files over {MAX_LINES} lines (split them by idea): {new}"
    fixed = sorted(KNOWN_LONG_FILES - set(long))
    assert not fixed, (
        f"no longer over {MAX_LINES} lines, remove them from KNOWN_LONG_FILES: {fixed}"
    )


def test_import_zo_is_light() -> None:
    script = (
        "import json, sys\n"
        "import zo\n"
        "light = 'transformers' not in sys.modules\n"
        "import zo.models\n"
        "modeling = sorted(m for m in sys.modules if '.modeling_' in m)\n"
        "print(json.dumps([light, modeling]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    light, modeling = json.loads(result.stdout.strip().splitlines()[-1])
    assert light, "`import zo` imports transformers (zo/__init__.py must stay light)"
    # zo.models names transformers classes and resolves them when a model is built
    assert modeling == [], f"`import zo.models` imports modeling modules: {modeling}"
