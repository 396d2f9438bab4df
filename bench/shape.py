"""The shape of the code: lines, import cycles, largest module and function.

Run ``python bench/shape.py`` from the checkout; issue 9 reports these
figures before and after.  Import cycles count every import, including
those inside functions (a function-level import hides a cycle, it does not
remove it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name to file, for every module of `package`."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that the module `name` imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets.add(base)
            targets.update("%s.%s" % (base, alias.name) for alias in node.names)
    return {t for t in targets if t in known and t != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(name: str, known: dict[str, Path]) -> str:
    """The subpackage a module belongs to, or the top-level module itself."""
    parts = name.split(".")
    return ".".join(parts[:2])


def longest_function(paths) -> tuple[int, str]:
    best = (0, "")
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                best = max(best, (length, "%s:%s" % (path, node.name)))
    return best


def lines(paths) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def main(root: Path) -> None:
    known = modules(root, "taskfarm")
    graph = {name: imports(path, name, known) for name, path in known.items()}
    # A package importing its own submodules is not a cycle of design.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    tests = sorted((root / "tests").rglob("*.py"))
    print("lines in taskfarm/: %d" % lines(known.values()))
    print("lines in tests/:    %d" % lines(tests))
    found = cycles(graph)
    print("import cycles:      %d between modules" % len(found))
    for component in found:
        print("  " + " <-> ".join(component))
    # Layers: a subpackage counts as one node, a top-level module as itself.
    layers: dict[str, set[str]] = {}
    for name, targets in graph.items():
        node = layer(name, known)
        layers.setdefault(node, set()).update(
            layer(t, known) for t in targets if layer(t, known) != node
        )
    for targets in list(layers.values()):
        for t in targets:
            layers.setdefault(t, set())
    found = cycles(layers)
    print("                    %d between packages" % len(found))
    for component in found:
        print("  " + " <-> ".join(component))
    largest = max(known.values(), key=lambda p: len(p.read_text().splitlines()))
    print("largest module:     %s (%d lines)" % (largest.relative_to(root),
                                                 len(largest.read_text().splitlines())))
    length, where = longest_function(known.values())
    print("longest function:   %s (%d lines)" % (Path(where).relative_to(root), length))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
