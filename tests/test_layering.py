"""The package's imports run strictly downward through its layers, with no cycle — not even through an import
placed inside a function — so that any layer can be read, tested and replaced without the ones above it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "dlm"

# Lowest first. A module may import its own package (the same unit) and any lower layer, never a higher one.
LAYERS = [
    ("dlm.plugins",),
    ("dlm.allocator", "dlm.precision", "dlm.memory", "dlm.data", "dlm.network", "dlm.errors", "dlm.faults",
     "dlm.progress"),
    ("dlm.tasks",),
    ("dlm.process",),
    ("dlm.sampler",),
    ("dlm.softmask",),
    ("dlm.config",),
    ("dlm.guards", "dlm.integrity"),
    ("dlm.checkpoint", "dlm.build", "dlm.generation"),
    ("dlm.edit", "dlm.view"),
    ("dlm.pipeline",),
    ("dlm.eval",),
    ("dlm.train",),
    ("dlm.serve",),
    ("dlm.cli", "dlm"),
]


def unit(module: str) -> str:
    """The layer unit a module belongs to: its package under dlm (dlm.process.mdlm -> dlm.process)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else "dlm"


def layer(module: str) -> int:
    u = unit(module)
    for i, names in enumerate(LAYERS):
        if u in names:
            return i
    raise AssertionError(f"{module} belongs to no layer of tests/test_layering.py: add its unit {u}")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dlm_imports(path: Path) -> list[tuple[str, int]]:
    """(imported dlm module, line) for every import in the file, at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "dlm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "dlm":
            out.append((node.module, node.lineno))
    return out


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {m: dlm_imports(p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    for target, line in GRAPH[module]:
        if unit(target) == unit(module):
            continue
        assert layer(target) < layer(module), (f"{MODULES[module]}:{line} imports {target} (layer {layer(target)}) "
                                               f"from layer {layer(module)}: imports must go down")


def test_no_import_cycle():
    """Depth-first search over every dlm import (a module importing a package imports its __init__)."""
    def targets(m):
        return [t for t, _ in GRAPH[m] if t in MODULES and t != m]

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in targets(m):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
