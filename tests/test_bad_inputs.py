"""Bad input, end to end: one table of CLI calls that must each fail with one line naming the file, record and field.

Every row runs `llm_attr.cli.main(argv)` in-process and checks: exit status 2; stderr is one line starting with
`error: ` holding the row's needles; no traceback; nothing half-written (an existing run directory is byte-identical
afterwards, a new output directory does not exist). A few rows also run as real processes (`python -m llm_attr`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm_attr.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = '{"id": "a", "prompt": "What is 2 + 3?", "response": "2 + 3 = 5. \\\\boxed{5}"}'
DAUNCE_YAML = "perturbations: 2\nmax_steps: 1\nbatch_size: 8\neval_batch_size: 16\nlora: {rank: 4, alpha: 8}\n"


# ---------------------------------------------------------------------- what the rows run against


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)


class PickleBomb:
    """Unpickling this creates the file named by `marker`: a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model_dir):
    """Data files, a tiny target run, a finished Daunce run and broken models / run directories to point at."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from llm_attr.config import load_config
    from llm_attr.data.math_task import make_math
    from llm_attr.data.records import save_jsonl
    from llm_attr.finetune import FinetuneConfig, finetune
    from llm_attr.methods.daunce import Daunce, DaunceConfig
    from llm_attr.models.lora import LoraArgs

    root = tmp_path_factory.mktemp("bad_inputs")
    c = SimpleNamespace(root=root, tiny=tiny_model_dir, marker=root / "code_ran")
    save_jsonl(make_math(8, seed=0), root / "train.jsonl")
    save_jsonl(make_math(2, seed=1), root / "query.jsonl")
    c.train, c.query = root / "train.jsonl", root / "query.jsonl"
    c.train_ids = [json.loads(line)["id"] for line in c.train.read_text().splitlines()]
    (root / "empty.jsonl").write_text("\n")
    (root / "daunce.yaml").write_text(DAUNCE_YAML)
    c.daunce_yaml = root / "daunce.yaml"
    c.target = finetune("builtin:tiny", c.train, root / "target",
                        FinetuneConfig(max_steps=1, batch_size=8, lora=LoraArgs(rank=4, alpha=8)))
    c.daunce = Daunce(load_config(DaunceConfig, c.daunce_yaml)).run(str(c.target), c.train, c.query,
                                                                       root / "daunce")

    c.no_tokenizer = root / "no_tokenizer"  # a model directory without tokenizer files
    c.no_tokenizer.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, c.no_tokenizer / name)

    c.no_pad = root / "no_pad"  # a tokenizer with neither a pad nor an EOS token
    shutil.copytree(tiny_model_dir, c.no_pad)
    tok_config = json.loads((c.no_pad / "tokenizer_config.json").read_text())
    tok_config.pop("pad_token")
    tok_config.pop("eos_token")
    (c.no_pad / "tokenizer_config.json").write_text(json.dumps(tok_config))

    c.bert = root / "bert"  # an encoder, not a causal LM
    BertModel(BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(c.bert)
    _copy_tokenizer(tiny_model_dir, c.bert)

    other = root / "other_base"  # a Llama of other shapes, and a run whose adapter was trained on builtin:tiny
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, head_dim=16)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "dtype",
                                                                                  "transformers_version")})
                     ).save_pretrained(other)
    _copy_tokenizer(tiny_model_dir, other)
    c.wrong_base_run = root / "wrong_base_run"
    shutil.copytree(c.target, c.wrong_base_run)
    manifest = json.loads((c.wrong_base_run / "manifest.json").read_text())
    (c.wrong_base_run / "manifest.json").write_text(json.dumps({**manifest, "base_model": str(other)}))

    c.remote = root / "remote_code"  # a model whose config asks to run its own code
    shutil.copytree(tiny_model_dir, c.remote)
    (c.remote / "evil.py").write_text(f"open({str(c.marker)!r}, 'w').close()\n"
                                      "from transformers import LlamaConfig as EvilConfig\n"
                                      "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((c.remote / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilModel"})
    (c.remote / "config.json").write_text(json.dumps(config))

    c.pickle_run = root / "pickle_run"  # a run whose adapter is a pickle that would run code
    shutil.copytree(c.target, c.pickle_run)
    (c.pickle_run / "adapter" / "adapter_model.safetensors").unlink()
    torch.save({"payload": PickleBomb(c.marker)}, c.pickle_run / "adapter" / "adapter_model.bin")

    c.tampered = root / "tampered"  # a Daunce run whose manifest names a shard outside the store
    shutil.copytree(c.daunce, c.tampered)
    manifest = json.loads((c.tampered / "manifest.json").read_text())
    manifest["shards"]["../../etc/passwd"] = "0" * 64
    (c.tampered / "manifest.json").write_text(json.dumps(manifest))

    c.symlinked = root / "symlinked"  # a Daunce index whose adapter 0 is a symlink out of the run
    shutil.copytree(c.daunce, c.symlinked)
    outside = root / "outside_adapter"
    shutil.move(c.symlinked / "adapters" / "00000", outside)
    (c.symlinked / "adapters" / "00000").symlink_to(outside)
    return c


# ---------------------------------------------------------------------- the table


@dataclass
class Case:
    """One row: `argv(ctx, data, out)` -> CLI arguments; `data`: lines of a JSONL file the row writes."""

    id: str
    argv: object
    needles: list[str]
    data: list[str] | None = None
    out: str = "new"  # new: a fresh --out that must not exist afterwards; existing: a copy of the Daunce run
    patch: object = None  # patch(monkeypatch, ctx, out): inject a fault
    skip_on_gpu: bool = False
    marks: list = field(default_factory=list)


def finetune_on_data(c, data, out):
    return ["finetune", "--model", str(c.tiny), "--train", str(data), "--out", str(out), "--set", "max_steps=1"]


def finetune_with(*extra):
    return lambda c, data, out: ["finetune", "--model", str(c.tiny), "--train", str(c.train), "--out", str(out),
                                 "--set", "max_steps=1", *extra]


def finetune_model(attr):
    return lambda c, data, out: ["finetune", "--model", str(getattr(c, attr)), "--train", str(c.train), "--out",
                                 str(out), "--set", "max_steps=1"]


def daunce_with(*extra, train=None, query=None):
    def argv(c, data, out):
        return ["daunce", "--model", str(c.target), "--train", str(data if train == "data" else c.train),
                "--query", str(data if query == "data" else c.root / query if query else c.query),
                "--out", str(out), "--config", str(c.daunce_yaml), *extra]

    return argv


def nan_loss(monkeypatch, c, out):
    monkeypatch.setattr("llm_attr.training.per_example_loss",
                        lambda logits, labels: torch.full((logits.shape[0],), float("nan")))


def disk_full(monkeypatch, c, out):
    replace = os.replace

    def full(src, dst, *args, **kwargs):
        if str(Path(out).resolve()) in str(Path(dst).resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)


CASES = [
    # data files (the loader-level table of the data module, now run through the CLI)
    Case("malformed-json", finetune_on_data, [":2", "malformed JSON"],
         [GOOD, '{"id": "b", "prompt": "x", "response": ']),
    Case("missing-id", finetune_on_data, [":1", "missing field 'id'"], ['{"prompt": "x", "response": "y"}']),
    Case("missing-prompt", finetune_on_data, [":1", "(id 'a')", "missing field 'prompt'"],
         ['{"id": "a", "response": "y"}']),
    Case("missing-response", finetune_on_data, [":1", "missing field 'response'"], ['{"id": "a", "prompt": "x"}']),
    Case("empty-response", finetune_on_data, [":1", "field 'response' is empty"],
         ['{"id": "a", "prompt": "x", "response": "   "}']),
    Case("empty-prompt", finetune_on_data, [":1", "field 'prompt' is empty"],
         ['{"id": "a", "prompt": "", "response": "y"}']),
    Case("wrong-type-response", finetune_on_data, [":1", "field 'response' must be a string, got int"],
         ['{"id": "a", "prompt": "x", "response": 3}']),
    Case("duplicate-ids", finetune_on_data, ["record 2", "duplicate id 'a'"], [GOOD, GOOD]),
    Case("not-an-object", finetune_on_data, [":1", "expected a JSON object"], ['["not", "an", "object"]']),
    Case("chat-without-assistant", finetune_on_data, [":1", "field 'messages'", "assistant"],
         ['{"id": "a", "messages": [{"role": "user", "content": "hi"}]}']),
    Case("chat-message-without-role", finetune_on_data, [":1", "messages[0]"],
         ['{"id": "a", "messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}']),
    Case("wrong-type-metadata", finetune_on_data, [":1", "field 'metadata' must be an object"],
         ['{"id": "a", "prompt": "x", "response": "y", "metadata": [1]}']),
    Case("wrong-type-id", finetune_on_data, [":1", "field 'id'"], ['{"id": true, "prompt": "x", "response": "y"}']),
    Case("empty-train-file", finetune_on_data, ["no records"], [""]),
    Case("train-file-missing", lambda c, data, out: finetune_on_data(c, c.root / "nope.jsonl", out),
         ["nope.jsonl: file not found"]),
    Case("empty-query-file", daunce_with(query="empty.jsonl"), ["empty.jsonl: no records"], out="existing"),
    Case("malformed-query-on-existing-run", daunce_with(query="data"), [":1", "malformed JSON"], ['{"id": '],
         out="existing"),
    Case("response-removed-by-truncation", finetune_with("--set", "max_length=1"),
         ["train.jsonl: record 1 (id ", "field 'response' is removed entirely by truncation", "max_length=1"]),
    # models, tokenizers, adapters
    Case("tokenizer-without-pad-or-eos", finetune_model("no_pad"), ["no_pad", "neither a pad token nor an EOS"]),
    Case("model-without-tokenizer", finetune_model("no_tokenizer"), ["no_tokenizer", "no tokenizer there"]),
    Case("non-causal-model", finetune_model("bert"), ["bert", "'bert' model is an encoder",
                                                      "not a causal language model"]),
    Case("adapter-for-another-base", lambda c, data, out: [
        "gradients", "--model", str(c.wrong_base_run), "--train", str(c.train), "--query", str(c.query), "--out",
        str(out)], ["wrong_base_run/adapter", "trained on a base model of other shapes", "q_proj"]),
    Case("remote-code-without-flag", finetune_model("remote"), ["remote_code", "auto_map", "--trust-remote-code"]),
    Case("pickled-adapter", lambda c, data, out: ["generate", "--model", str(c.pickle_run), "--data", str(c.query)],
         ["pickle_run/adapter", "pickle", "adapter_model.safetensors only"], out="none"),
    # configs
    Case("unknown-config-key", daunce_with("--set", "nonsense=1"), ["--set", "unknown key(s) ['nonsense']"],
         out="existing"),
    Case("perturbations-below-2", daunce_with("--set", "perturbations=1"), ["perturbations must be >= 2"],
         out="existing"),
    Case("negative-learning-rate", finetune_with("--set", "learning_rate=-1e-4"), ["learning_rate must be > 0"]),
    Case("lora-rank-0", finetune_with("--set", "lora.rank=0"), ["lora.rank must be >= 1"]),
    Case("config-value-wrong-type", finetune_with("--set", "learning_rate=fast"),
         ["learning_rate", "expected float, got 'fast'"]),
    Case("config-file-missing", lambda c, data, out: [*finetune_with()(c, data, out), "--config",
                                                      str(c.root / "nope.yaml")], ["nope.yaml: config file not found"]),
    Case("unknown-dtype", finetune_with("--set", "dtype=float64"), ["dtype 'float64'", "float32"]),
    Case("quantization-without-gpu", finetune_with("--set", "quantization=4bit"), ["4bit", "needs a CUDA GPU"],
         skip_on_gpu=True),
    # run directories, faults
    Case("tampered-shard-name", lambda c, data, out: ["score", str(c.tampered)],
         ["tampered/manifest.json", "field 'shards'", "'../../etc/passwd'"], out="none"),
    Case("adapter-index-symlink-out", lambda c, data, out: ["query", str(c.symlinked), "--query", str(c.query),
                                                            "--out", str(out)],
         ["symlinked", "adapter index, perturbation 0", "outside"]),
    Case("not-a-run-directory", lambda c, data, out: ["score", str(c.root)], ["not a store directory"], out="none"),
    Case("nan-loss", finetune_with(), ["non-finite loss at step 0 on examples", "'math-"], patch=nan_loss),
    Case("disk-full", daunce_with(), ["daunce_copy/manifest.json", "disk full", "left as it was"], out="existing",
         patch=disk_full),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, ctx, tmp_path, capsys, monkeypatch):
    if case.skip_on_gpu and torch.cuda.is_available():
        pytest.skip("a GPU is present: the option is valid here")
    data = None
    if case.data is not None:
        data = tmp_path / "data.jsonl"
        data.write_text("\n".join(case.data) + "\n")
    out = tmp_path / ("daunce_copy" if case.out == "existing" else "out")
    if case.out == "existing":
        shutil.copytree(ctx.daunce, out)
    before = snapshot(out) if case.out == "existing" else None
    if case.patch:
        case.patch(monkeypatch, ctx, out)
    code = main(case.argv(ctx, data, out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in case.needles:
        assert needle in err, (needle, err)
    if data is not None:
        assert str(data) in err
    if case.out == "existing":
        assert snapshot(out) == before  # earlier results byte-identical
    elif case.out == "new":
        assert not out.exists()  # no half-written run left behind
    assert not ctx.marker.exists()  # no pickle payload or model code ever ran


def test_table_is_large_enough():
    assert len(CASES) >= 20


# ---------------------------------------------------------------------- as real processes


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_ATTR_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "llm_attr", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def test_real_processes_exit_non_zero_with_one_line(ctx, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + '\n{"id": "b", "prompt": 1, "response": "y"}\n')
    proc = run_cli("finetune", "--model", str(ctx.tiny), "--train", str(bad), "--out", str(tmp_path / "ft"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == proc.stderr.strip()
    assert proc.stderr.startswith(f"error: {bad}:2 (id 'b'): field 'prompt' must be a string")
    assert not (tmp_path / "ft").exists()

    proc = run_cli("daunce", "--model", str(ctx.target), "--train", str(ctx.train), "--query", str(ctx.query),
                   "--out", str(tmp_path / "d"), "--set", "perturbations=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --set: perturbations must be >= 2") and proc.stderr.count("\n") == 1


def test_debug_shows_the_traceback(ctx, tmp_path):
    proc = run_cli("--debug", "finetune", "--model", str(ctx.tiny), "--train", str(ctx.root / "empty.jsonl"),
                   "--out", str(tmp_path / "ft"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "DataError: " in proc.stderr and "no records" in proc.stderr


# ---------------------------------------------------------------------- untrusted files


def test_package_never_unpickles():
    """No torch.load / pickle / np.load(allow_pickle) in the package: weights come from safetensors only."""
    import re

    import llm_attr

    root = Path(llm_attr.__file__).parent
    pattern = re.compile(r"torch\.load\(|\bimport pickle\b|pickle\.loads?\(|allow_pickle\s*=\s*True|joblib\.load")
    found = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), start=1) if pattern.search(line)]
    assert found == []


def test_pickled_adapter_is_refused_and_never_unpickled(ctx):
    from llm_attr.errors import ModelError
    from llm_attr.models.loading import load_model
    from llm_attr.models.lora import load_adapter

    assert (ctx.target / "adapter" / "adapter_model.safetensors").is_file()  # what we write
    assert not list((ctx.target / "adapter").glob("*.bin"))
    assert all((d / "adapter_model.safetensors").is_file() for d in (ctx.daunce / "adapters").iterdir())
    with pytest.raises(ModelError, match="pickle"):
        load_model(str(ctx.pickle_run))
    base = load_model(str(ctx.tiny)).model
    with pytest.raises(ModelError, match="adapter_model.safetensors only"):
        load_adapter(base, str(ctx.pickle_run / "adapter"))
    assert not ctx.marker.exists()


def test_remote_code_is_off_unless_asked_and_the_flag_reaches_the_loader(ctx, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from llm_attr.errors import ModelError
    from llm_attr.models.loading import load_model

    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_model(str(ctx.remote))
    assert not ctx.marker.exists()  # refused before any of its code was imported

    seen = []

    def spy(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise ValueError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    for command in (["generate", "--data", str(ctx.query)],
                    ["gradients", "--train", str(ctx.train), "--query", str(ctx.query), "--out",
                     str(ctx.root / "g")]):
        for flag in ([], ["--trust-remote-code"]):
            assert main([command[0], "--model", str(ctx.tiny), *command[1:], *flag]) == 2
    assert seen == [False, True, False, True]
    assert "stop here" in capsys.readouterr().err


def test_paths_from_manifests_cannot_leave_the_run_directory(ctx, tmp_path):
    from llm_attr.errors import RunDirError
    from llm_attr.io import contained_path
    from llm_attr.methods.blackbox import check_local_jobs
    from llm_attr.store import Store

    run = tmp_path / "run"
    (run / "jobs" / "local-1" / "adapter").mkdir(parents=True)
    good = {"0": {"job_id": "local-1", "model_id": str(run / "jobs" / "local-1" / "adapter")}}
    check_local_jobs(good, run / "jobs", run / "manifest.json")
    for entry, field_name in [({"job_id": "../../etc"}, "jobs.0.job_id"), ({"job_id": "/tmp/x"}, "jobs.0.job_id"),
                              ({"model_id": "/tmp/x"}, "jobs.0.model_id"),
                              ({"model_id": str(run / "jobs" / ".." / "..")}, "jobs.0.model_id")]:
        with pytest.raises(RunDirError, match=f"manifest.json: field '{field_name}'"):
            check_local_jobs({"0": entry}, run / "jobs", run / "manifest.json")
    (run / "link").symlink_to(tmp_path)
    for name in ("/etc/passwd", "../x", "a/../../x", "link/x"):
        with pytest.raises(RunDirError, match="where"):
            contained_path(run, name, "where")
    assert contained_path(run, "jobs/local-1", "where") == run / "jobs" / "local-1"

    store = tmp_path / "store"  # a shard file swapped for a symlink out of the store is never read
    shutil.copytree(ctx.daunce, store)
    shard = store / "shards" / "perturbation-00000.safetensors"
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(RunDirError, match="outside"):
        Store.open(store).read_shard("perturbation-00000")
