"""The package's layers (docs/design.md, section 2): no module imports one of a layer above its own, function-level
imports included; and every method module stays small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llm_attr"

#: top first; a module may import its own layer and the ones below. A package name stands for its modules that
#: are not listed on their own.
LAYERS = [
    ["", "cli", "demo", "__main__"],  # "": the package itself, its public names
    ["evaluation"],
    ["finetune", "methods", "methods.daunce", "methods.gradient_attribution", "methods.further_training",
     "methods.blackbox", "methods.daunce_store", "methods.daunce_tokens", "methods.gradient_store", "evaluation.retrain"],
    ["methods.gradients", "methods.preconditioners", "methods.registry", "backends"],
    ["pipeline", "runner", "context", "fingerprints", "results"],
    ["scoring"],
    ["training", "losses", "reduced_head", "generation", "models"],
    ["data"],
    ["store", "io", "config", "errors", "faults", "utils"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
#: the method modules (one strategy each) and the most lines each may have
METHOD_MODULES = {"methods/daunce.py": 300, "methods/daunce_tokens.py": 300, "methods/daunce_objective.py": 300, "methods/daunce_store.py": 300, "methods/gradient_store.py": 300, "methods/further_training.py": 300,
                  "methods/registry.py": 300, "methods/daunce_blocks.py": 300, "methods/daunce_config.py": 300}


def layer_of(module: str) -> int:
    name = module
    while name not in RANK:
        assert "." in name, f"llm_attr.{module} is in no layer: add it to docs/design.md's layers and to LAYERS"
        name = name.rsplit(".", 1)[0]
    return RANK[name]


def module_name(path: Path) -> tuple[str, list[str]]:
    """(dotted name inside the package, the package it lives in as parts)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), parts[:-1]
    return ".".join(parts), parts[:-1]


def imported(path: Path) -> list[tuple[str, int]]:
    """(dotted module inside the package, line) of every import of the package in `path`."""
    _, package = module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                out.append((".".join([*base, *node.module.split(".")]), node.lineno))
            else:
                out += [(".".join([*base, alias.name]), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llm_attr"):
            out.append((node.module.removeprefix("llm_attr").lstrip("."), node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("llm_attr").lstrip("."), node.lineno) for a in node.names
                    if a.name.startswith("llm_attr")]
    return out


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me, _ = module_name(path)
        for target, line in imported(path):
            if layer_of(target) < layer_of(me):
                upward.append(f"llm_attr/{path.relative_to(PACKAGE)}:{line} imports llm_attr.{target}")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_function_level_imports():
    names = [t for t, _ in imported(PACKAGE / "cli.py")]
    assert "methods.registry" in names and "finetune" in names  # top-level and function-level imports
    assert layer_of("scoring.writer") > layer_of("methods.daunce") > layer_of("cli")


def test_method_modules_stay_small():
    sizes = {name: len((PACKAGE / name).read_text().splitlines()) for name in METHOD_MODULES}
    assert all(sizes[name] <= limit for name, limit in METHOD_MODULES.items()), sizes
