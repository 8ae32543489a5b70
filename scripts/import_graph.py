"""Print the module-level import cycles among vdiskfs/ and emulator/ modules.

Only imports that run when a module is first imported count: those at module level, including
inside module-level ``try``/``if`` blocks, but not inside functions or classes' methods, and not
under ``if TYPE_CHECKING:`` (never run). A strongly connected component of more than one module is
a cycle: each of its modules can be half-initialised when another one reads it.

Usage: ``python scripts/import_graph.py [--function-local] [ROOT]``; exits 1 when there is a
cycle. ``--function-local`` counts imports inside functions too, to show the cycles they hide.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("vdiskfs", "emulator")


def module_files(root: Path) -> dict[str, Path]:
    """Map each module name under :data:`PACKAGES` to its file."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    # Functions and classes' bodies run later (or, for a class, at import time but never in
    # this code base's imports); TYPE_CHECKING blocks never run.
    for stmt in body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            yield stmt
        elif isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _module_level(stmt.body)
            yield from _module_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody):
                yield from _module_level(block)
            for handler in stmt.handlers:
                yield from _module_level(handler.body)


def _everywhere(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    # Every import that can run, function-local ones included: the graph that shows the cycles
    # a function-local import hides.
    hidden = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test)
        for inner in stmt.body
        for node in ast.walk(inner)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in hidden:
            yield node


def import_graph(root: Path, *, function_local: bool = False) -> dict[str, set[str]]:
    """Edges from each module to the project modules it imports at module level.

    With ``function_local``, imports inside functions count too.
    """
    files = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        imports = _everywhere(tree) if function_local else _module_level(tree.body)
        for stmt in imports:
            targets: list[str] = []
            if isinstance(stmt, ast.Import):
                targets = [alias.name for alias in stmt.names]
            else:
                base = stmt.module or ""
                if stmt.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - stmt.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import sub`` needs only ``pkg.sub`` (and ``pkg``, as every submodule
                # import does, which is no cycle); ``from mod import name`` needs ``mod``.
                subs = [f"{base}.{alias.name}" for alias in stmt.names]
                targets = [sub for sub in subs if sub in files] or [base]
            for target in targets:
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
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
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def main() -> int:
    args = sys.argv[1:]
    function_local = "--function-local" in args
    args = [arg for arg in args if arg != "--function-local"]
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    graph = import_graph(root, function_local=function_local)
    found = cycles(graph)
    where = "module-level and function-local" if function_local else "module-level"
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} {where} import edges")
    for component in found:
        print(f"cycle of {len(component)}: {' '.join(component)}")
    print(f"{len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
