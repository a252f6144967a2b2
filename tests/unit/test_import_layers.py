"""The import graph of `facepipe` points one way: no cycle, and no import from a lower layer to a higher one.

Layers, top to bottom (a module may import its own layer or any layer below it):

    commands / cli / orchestration      (front doors: argument parsing, printing; what the flows run)
    train                               (Ray stages, drivers)
    tracking, eval                      (MLflow registry; metrics and reports)
    models                              (backbones, margin heads, the saved-model bundle, embedding, export)
    uncertainty, data                   (uncertainty methods and head I/O; data formats and loaders)
    base                                (config, errors, fsutil, progress, cluster, services, ...)

Every import counts, also those inside functions: a lazy import still ties the two modules together.
The graph is read from the source with `ast` (nothing is imported), so the test is fast and needs no torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "facepipe"

# the layer of each top-level package or module under facepipe/; larger = higher
LAYERS: dict[str, int] = {
    "commands": 5,
    "cli": 5,
    "__main__": 5,
    "orchestration": 5,
    "train": 4,
    "tracking": 3,
    "eval": 3,
    "models": 2,
    "uncertainty": 1,
    "data": 1,
}
BASE = 0  # everything not named above: config, errors, fsutil, progress, cluster, services, __init__


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The facepipe modules `name` imports (`from pkg import sub` counts as importing `pkg.sub`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], BASE) if len(parts) > 1 else BASE


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in graph.items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    )


def test_graph_is_read() -> None:
    graph = import_graph()
    assert "facepipe.train.backbone" in graph
    assert "facepipe.config" in graph["facepipe.train.backbone"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    bad = upward_imports(import_graph())
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("graph", "expect_cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expect_cycle: bool) -> None:
    assert (find_cycle(graph) is not None) == expect_cycle


def test_layer_checker_flags_an_upward_import() -> None:
    graph = {"facepipe.models.export": {"facepipe.train.checkpoint"}, "facepipe.train.checkpoint": set()}
    assert upward_imports(graph) == [
        "facepipe.models.export (layer 2) imports facepipe.train.checkpoint (layer 4)"
    ]
