"""The package layout follows the data path, so imports point one way.

Layers, lowest first (a module may import its own package and any lower layer, never a higher one,
lazily inside a function or not)::

    leaves      registry, device, distributed, config (the schema), cli, models, lora (adapters), tracking
    data        prompts, sources, the completion format
    rewards     parsing, verifier guard, reward components, token spans
    metrics     calibration / abstention metrics, voting (numpy only)
    objectives  advantages and objective combiners
    rl          rollouts, decode loop, policy loss, update engines, GRPO, SFT
    eval        evaluator, confidence signals, plots, the calibrl-eval job
    report      calibrl-compare
    run         the main job's orchestration
    entries     train, compare (the console scripts' modules)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "calibrl"

LAYERS = [
    {"registry", "device", "distributed", "config", "cli", "models", "lora", "tracking"},
    {"data"},
    {"rewards"},
    {"metrics"},
    {"objectives"},
    {"rl"},
    {"eval"},
    {"report"},
    {"run"},
    {"train", "compare"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """``calibrl.rl.grpo`` -> ``rl``; ``calibrl`` itself -> ``calibrl``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported calibrl module, at module level)`` for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("calibrl"):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("calibrl")]
        found += [(n, id(node) in top) for n in names]
    return found


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()} - {"calibrl"}
    assert units <= set(RANK), f"modules with no layer: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("module", [m for m in _modules() if m != "calibrl"])
def test_no_import_from_a_higher_layer(module):
    path = _modules()[module]
    mine = RANK[_unit(module)]
    upward = [imp for imp, _ in _imports(path) if imp != "calibrl" and RANK[_unit(imp)] > mine]
    assert not upward, f"{module} (layer {mine}) imports higher layers: {upward}"


def test_no_import_cycles_at_module_level():
    modules = _modules()
    graph = {m: {i for i, top in _imports(p) if top and i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
