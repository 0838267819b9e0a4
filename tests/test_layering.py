"""The layering of lorafit's modules (README, "Architecture"): no module imports one above it, and
there are no import cycles — function-level imports included, so none can hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lorafit"

# Bottom to top; a module may import its own layer and the layers below.
LAYERS = [
    ("lorafit", "lorafit.config", "lorafit.files", "lorafit.console", "lorafit.callbacks", "lorafit.metrics",
     "lorafit.quant", "lorafit.linalg"),
    ("lorafit.models", "lorafit.data", "lorafit.adapters"),
    ("lorafit.task", "lorafit.assemble", "lorafit.estimate"),
    ("lorafit.inits", "lorafit.optim", "lorafit.rlhf"),
    ("lorafit.train",),
    ("lorafit.eval",),
    ("lorafit.run", "lorafit.sweep", "lorafit.merge", "lorafit.export", "lorafit.cli", "lorafit.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` named in :data:`LAYERS`."""
    best, found = -1, None
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), number
    assert found is not None, f"{module} is in no layer; add it to LAYERS (and to the README's table)"
    return found


def imports_of(module: str) -> set[str]:
    """The lorafit modules ``module`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorafit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafit"):
            for alias in node.names:   # `from lorafit.data import glue` imports the module lorafit.data.glue
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found - {module}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [f"{m} (layer {layer_of(m)}) imports {i} (layer {layer_of(i)})"
              for m in sorted(MODULES) for i in sorted(imports_of(m)) if layer_of(i) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = {m: imports_of(m) & MODULES.keys() for m in MODULES}
    # a package imports nothing just by containing a module: only explicit imports are edges
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
