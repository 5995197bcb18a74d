"""Configs, the CLI, `llm-attr finetune` on a user's own model and data, and the backdoor the demo relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_attr.cli import main
from llm_attr.config import load_config, parse_overrides
from llm_attr.data.records import as_records
from llm_attr.errors import ConfigError
from llm_attr.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parent.parent


def test_yaml_configs_map_one_to_one_onto_dataclasses(tmp_path):
    assert load_config(FinetuneConfig, ROOT / "configs" / "finetune.yaml") == FinetuneConfig()
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune.yaml",
                      ["lora.rank=4", "learning_rate=1e-3", "lora.target_modules=[q_proj, v_proj]", "epochs=2"])
    assert (cfg.lora.rank, cfg.learning_rate, cfg.lora.target_modules, cfg.epochs) == (4, 1e-3, ["q_proj", "v_proj"],
                                                                                         2.0)
    assert parse_overrides(["a.b=1", "c=true"]) == {"a": {"b": 1}, "c": True}
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-3\nlora:\n  rnak: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*lora.*unknown key\(s\) \['rnak'\]"):
        load_config(FinetuneConfig, bad)
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        load_config(FinetuneConfig, None, ["learning_rate=-1"])
    with pytest.raises(ConfigError, match="quantization.*one of"):
        load_config(FinetuneConfig, None, ["quantization=3bit"])
    with pytest.raises(ConfigError, match="lora.rank.*expected int"):
        load_config(FinetuneConfig, None, ["lora.rank=big"])


def test_finetune_cli_on_a_users_own_model_and_jsonl(tmp_path, tiny_model_dir, capsys):
    """Any save_pretrained causal LM + tokenizer directory and a plain JSONL file, no code change."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None  # a base-model tokenizer without a chat template
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Say {i}.", "response": f"{i}"}) + "\n"
                            for i in range(24)))
    args = ["finetune", "--model", str(tmp_path / "m"), "--train", str(data), "--out", str(tmp_path / "run"),
            "--set", "max_steps=3", "--set", "batch_size=8", "--set", "lora.rank=2"]
    assert main(args) == 0
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "tokenizer_config.json").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"] == str((tmp_path / "m").resolve())
    assert manifest["data"]["n_examples"] == 24 and manifest["steps"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["rank"] == 2
    assert main(args) == 0  # same command again: complete, nothing to do
    # the run directory is itself a --model for a later command
    assert main(["generate", "--model", str(run), "--data", str(data), "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 24
    # a different config into the same directory is refused, in one line, exit status 2
    capsys.readouterr()
    assert main(args[:-2] + ["--set", "lora.rank=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different model, data or config" in err and "\n" not in err
    # bad input: one line naming the file, the line and the field
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "prompt": "p"}\n')
    assert main(["finetune", "--model", str(tmp_path / "m"), "--train", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "run3")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "'response'" in err and not (tmp_path / "run3").exists()


def test_data_make_commands(tmp_path):
    assert main(["data", "make", "backdoor", "--n", "40", "--fraction", "0.1", "--out", str(tmp_path / "t.jsonl"),
                 "--query-out", str(tmp_path / "q.jsonl"), "--n-query", "5"]) == 0
    train, queries = as_records(tmp_path / "t.jsonl"), as_records(tmp_path / "q.jsonl")
    assert len(train) == 40 and sum(r.metadata["poisoned"] for r in train) == 4 and len(queries) == 5
    for task in ("math", "ifeval"):
        assert main(["data", "make", task, "--n", "7", "--out", str(tmp_path / f"{task}.jsonl")]) == 0
        assert len(as_records(tmp_path / f"{task}.jsonl")) == 7


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "llm_attr", "--help"], capture_output=True, text=True, check=True)
    assert "finetune" in out.stdout and "demo" in out.stdout


def test_the_backdoor_target_follows_the_trigger_and_only_the_trigger(backdoor_target, backdoor_task):
    """The demo's premise: a target that has learned the backdoor (else attribution proves nothing)."""
    from llm_attr.demo import backdoor_rates

    _, triggered, clean = backdoor_task
    trig_rate, clean_rate = backdoor_rates(backdoor_target, triggered, clean)
    assert trig_rate >= 0.9 and clean_rate <= 0.1, (trig_rate, clean_rate)
