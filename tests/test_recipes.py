"""Every recipe imports against the current package and documents itself (`--help`): a moved function breaks a
recipe only at run time, often an hour into a study, so it is caught here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.py")
                 if not p.name.startswith("_"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_imports_and_prints_its_help(recipe):
    done = subprocess.run([sys.executable, str(recipe), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "--work" in done.stdout


def test_a_sweep_variant_may_carry_a_list_value():
    sys.path.insert(0, str(RECIPES[0].parent))
    from _study import parse_variant

    name, overrides = parse_variant("mlp:lora.target_modules=[gate_proj,up_proj,down_proj],lora.rank=8")
    assert name == "mlp"
    assert overrides == {"lora": {"target_modules": ["gate_proj", "up_proj", "down_proj"], "rank": 8}}
    assert parse_variant("default") == ("default", {})
