"""Config help everywhere: every config field has help text, `--help` lists every `--set` key with its default
and help, `--print-config` writes a complete YAML, and the shipped YAML configs are found from a wheel install."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_attr.backends.local import LocalBackendArgs
from llm_attr.backends.openai_api import OpenAIBackendArgs
from llm_attr.cli import main
from llm_attr.config import config_yaml, describe_fields, field_help, load_config
from llm_attr.evaluation.removal import RemovalConfig
from llm_attr.evaluation.retrain import RetrainConfig
from llm_attr.finetune import FinetuneConfig
from llm_attr.methods.blackbox import BlackBoxConfig
from llm_attr.methods.daunce import DaunceConfig
from llm_attr.methods.further_training import FurtherTrainingConfig
from llm_attr.methods.gradient_attribution import GradientConfig
from llm_attr.models.lora import LoraArgs
from llm_attr.training import TrainingArgs

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [TrainingArgs, LoraArgs, FinetuneConfig, DaunceConfig, GradientConfig, FurtherTrainingConfig,
           RetrainConfig, RemovalConfig, BlackBoxConfig, LocalBackendArgs, OpenAIBackendArgs]
#: (argv of the command, its config class)
COMMANDS = [(["finetune"], FinetuneConfig), (["daunce"], DaunceConfig), (["gradients"], GradientConfig),
            (["further-train"], FurtherTrainingConfig), (["retrain"], RetrainConfig),
            (["eval", "removal"], RemovalConfig), (["eval", "backdoor"], RemovalConfig)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if len(field_help(cls, f.name).strip()) < 8]
    assert not missing, f"{cls.__name__}: fields without help: {missing}"


@pytest.mark.parametrize(("argv", "cls"), COMMANDS, ids=lambda a: a if isinstance(a, str) else None)
def test_help_lists_every_set_key_with_its_default_and_help(argv, cls, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    keys = describe_fields(cls)
    assert len(keys) >= len(dataclasses.fields(cls))
    for key, default, help_, section in keys:
        if section:
            assert f"  {key}.*: {help_}" in out
        else:
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            assert f"  {key} = {shown}: {help_}" in out, key


@pytest.mark.parametrize(("argv", "cls"), COMMANDS[:5] + [(["daunce", "--backend", "local"], BlackBoxConfig)],
                         ids=lambda a: a if isinstance(a, str) else None)
def test_print_config_writes_a_complete_yaml_that_loads_back(argv, cls, tmp_path, capsys):
    key, value = ("seed", 7)
    assert main([*argv, "--print-config", "--set", f"{key}={value}"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    data = yaml.safe_load(text)
    assert set(data) == {f.name for f in dataclasses.fields(cls)}  # complete: every field, nothing else
    expected = load_config(cls, None, [f"{key}={value}"])
    assert load_config(cls, path) == expected and getattr(expected, key) == value
    assert text.count("\n# ") + text.startswith("# ") >= len(dataclasses.fields(cls))  # each key's help


def test_config_yaml_round_trips_nested_sections():
    cfg = load_config(DaunceConfig, None, ["lora.rank=4", "lora.target_modules=[q_proj, v_proj]", "measure=cov"])
    assert yaml.safe_load(config_yaml(cfg))["lora"] == dataclasses.asdict(cfg.lora)


def test_shipped_configs_load_from_a_wheel_install_in_another_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "llm_attr", src / "llm_attr", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("llm_attr-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import llm_attr, pathlib, sys\n"
        f"assert pathlib.Path(llm_attr.__file__).is_relative_to({str(target)!r}), llm_attr.__file__\n"
        "from llm_attr.config import builtin_config_dir, load_config\n"
        "from llm_attr.demo import target_config, DEMO_GRADIENTS\n"
        "from llm_attr.methods.daunce import DaunceConfig\n"
        "from llm_attr.methods.gradient_attribution import GradientConfig\n"
        "from llm_attr.evaluation.retrain import RetrainConfig\n"
        "assert target_config().epochs > 0\n"
        "assert load_config(DaunceConfig, 'configs/daunce.yaml') == DaunceConfig()\n"
        "assert load_config(RetrainConfig, 'configs/tiny/retrain.yaml').subsets >= 2\n"
        "load_config(GradientConfig, builtin_config_dir() / 'gradients.yaml', DEMO_GRADIENTS)\n"
        "print(sorted(p.name for p in builtin_config_dir().glob('*.yaml')))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert proc.stdout.strip() == str(shipped) and "daunce.yaml" in shipped


def test_readme_layout_names_every_module_and_design_doc_exists():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    words = set(layout.translate(str.maketrans(",();:", "     ")).split())
    package = ROOT / "llm_attr"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name.startswith("__") or "configs" in path.parts:
            continue
        if path.stem not in words and path.name not in words:
            missing.append(str(path.relative_to(package)))
    for folder in sorted(p for p in package.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        if f"{folder.name}/" not in words:
            missing.append(f"{folder.name}/")
    assert not missing, f"README layout does not name: {missing}"
    design = (ROOT / "docs" / "design.md").read_text()
    for section in ("## 2. Layers", "## 3. Data flow", "## 4. The run-directory contract", "## 6. Adding a method"):
        assert section in design
    assert "DESIGN.md" not in design


def test_a_partial_nested_override_keeps_the_fields_own_defaults():
    """`--set lora.layers=2` on Daunce changes the layers only: rank and alpha stay Daunce's (64, 128), not LoraArgs'."""
    from llm_attr.config import load_config
    from llm_attr.methods.daunce import DaunceConfig

    cfg = load_config(DaunceConfig, None, ["lora.layers=2"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.layers) == (64, 128.0, 2)
    assert load_config(DaunceConfig, None, {"lora": {"rank": 4}}).lora.alpha == 128.0
