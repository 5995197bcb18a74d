"""`llm-attr gradients` end to end: the store-backed scores against in-memory oracles, resume, refusal, processes.

The target is builtin:tiny with a rank-4 LoRA adapter whose B is small and random (so both A and B get gradients),
saved as a run directory; 24 training and 4 query MATH records, blocks of 8 (3 train shards, 1 query shard).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_attr.cli import main
from llm_attr.config import load_config
from llm_attr.data.math_task import make_math
from llm_attr.data.records import as_records, save_jsonl
from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
from llm_attr.errors import ConfigError, RunDirError
from llm_attr.losses import model_inputs, per_example_loss
from llm_attr.methods import GradientAttribution, GradientConfig
from llm_attr.methods.gradient_attribution import METHODS, gradient_shard, score_run
from llm_attr.methods.gradients import GradientExtractor, KroneckerFactors
from llm_attr.methods.preconditioners import EKFAC, KFAC, Cosine, DampedFisher, score, tracin_scores
from llm_attr.models.loading import LoadedModel, load_model
from llm_attr.models.lora import LoraArgs, attach_lora
from llm_attr.scoring import load_scores

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--set", "block_size=8", "--set", "batch_size=8", "--set", "dtype=float32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def save_random_adapter(base, path: Path, seed: int) -> None:
    """A rank-4 LoRA adapter on `base` with B ~ 0.05 N(0, 1) (seeded), saved in peft format at `path`."""
    model = attach_lora(base, LoraArgs(rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    model.unload()


@pytest.fixture(scope="module")
def target(tmp_path_factory, tiny_model_dir) -> dict:
    """A run directory (base builtin:tiny + random LoRA), a second checkpoint adapter, and the data files."""
    root = tmp_path_factory.mktemp("gradients")
    base = load_model("builtin:tiny", device="cpu", dtype="float32").model
    save_random_adapter(base, root / "run" / "adapter", seed=0)
    (root / "run" / "manifest.json").write_text(json.dumps({"base_model": "builtin:tiny"}))
    save_random_adapter(base, root / "ckpt1", seed=1)
    records = make_math(28, seed=1)
    save_jsonl(records[:24], root / "train.jsonl")
    save_jsonl(records[24:], root / "query.jsonl")
    return {"root": root, "run": root / "run", "train": root / "train.jsonl", "query": root / "query.jsonl",
            "ckpt1": root / "ckpt1"}


@pytest.fixture(scope="module")
def oracle(target) -> dict:
    """The target kept as a PeftModel, its tokenizer and the tokenised train / query examples."""
    loaded = load_model(str(target["run"]), device="cpu", dtype="float32", merge_adapters=False)
    tok = loaded.tokenizer
    train, _ = tokenize_records(as_records(target["train"]), tok, 512)
    query, _ = tokenize_records(as_records(target["query"]), tok, 512)
    return {"model": loaded.model.eval(), "tokenizer": tok, "pad": pad_id_of(tok), "train": train, "query": query}


def cli(target, out: Path, *extra: str) -> int:
    return main(["-q", "gradients", "--model", str(target["run"]), "--train", str(target["train"]),
                 "--query", str(target["query"]), "--out", str(out), *SMALL, *extra])


def in_memory_gradients(oracle, rank: int, factors: KroneckerFactors | None = None):
    ext = GradientExtractor(oracle["model"], projection_rank=rank, seed=0)
    train = ext.per_example(collate(oracle["train"], oracle["pad"]), factors)
    query = ext.per_example(collate(oracle["query"], oracle["pad"]))
    return ext, train, query


def brute_force(model, extractor: GradientExtractor, examples, pad_id) -> torch.Tensor:
    """`[N, d]`: one example at a time, plain autograd on the tracked weights (rows `[out, in]` flattened)."""
    weights = [layer.module.weight for layer in extractor.layers]
    for w in weights:
        w.requires_grad_(True)
    try:
        rows = []
        for e in examples:
            batch = collate([e], pad_id)
            loss = per_example_loss(model(**model_inputs(batch)).logits, batch["labels"])[0]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)]))
    finally:
        for w in weights:
            w.requires_grad_(False)
    return torch.stack(rows)


# ---------------------------------------------------------------- end to end, every method


def test_cli_every_method_matches_in_memory_preconditioners(target, oracle, tmp_path, capsys):
    out = tmp_path / "run"
    factors = KroneckerFactors()
    ext, g_train, g_query = in_memory_gradients(oracle, rank=8, factors=factors)
    expected = {
        "grad-dot": score(g_query, g_train),
        "grad-cos": score(g_query, g_train, Cosine()),
        "if-fisher": score(g_query.double(), g_train.double(), DampedFisher().fit(g_train.double())),
        "if-kfac": score(g_query.double(), g_train.double(), KFAC(ext.layer_blocks).fit(factors)),
        "if-ekfac": score(g_query.double(), g_train.double(), EKFAC(ext.layer_blocks).fit(factors, g_train)),
    }
    expected["tracin"] = expected["grad-dot"]  # no checkpoints: the target alone, lr 1
    # one store, re-run with each method: the gradients are computed once, K-FAC statistics added when needed
    for method in ("grad-dot", "grad-cos", "if-fisher", "tracin", "if-kfac", "if-ekfac"):
        assert cli(target, out, "--set", "projection_rank=8", "--set", f"method={method}") == 0
        got = torch.from_numpy(np.array(load_scores(out / "scores.safetensors")))
        want = expected[method].float()
        assert got.shape == (4, 24)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())), method
        assert json.loads((out / "scores.json").read_text())["method"] == method
    printed = capsys.readouterr().out
    assert "math-00024" in printed and "scores:" in printed
    ids = json.loads((out / "ids.json").read_text())
    assert ids["query"] == [e.id for e in oracle["query"]] and ids["train"] == [e.id for e in oracle["train"]]
    assert "| math-00024 | 1 |" in (out / "topk.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shapes"]["train_gradients"] == [24, ext.dim]
    # `llm-attr score` rescores a gradient store with any method, from the shards alone
    assert main(["-q", "score", str(out), "--method", "grad-cos", "--top-k", "3"]) == 0
    got = torch.from_numpy(np.array(load_scores(out / "scores.safetensors")))
    assert torch.allclose(got, expected["grad-cos"], atol=1e-5)
    assert main(["-q", "score", str(out), "--signal", "loss"]) == 2  # a Daunce option: a one-line error
    # `llm-attr query`: new queries against the stored index; only their gradients are computed
    assert main(["-q", "query", str(out), "--query", str(target["query"]), "--out", str(tmp_path / "q"),
                 "--method", "if-ekfac"]) == 0
    got = torch.from_numpy(np.array(load_scores(tmp_path / "q" / "scores.safetensors")))
    want = expected["if-ekfac"].float()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert (tmp_path / "q" / "topk.md").is_file() and (tmp_path / "q" / "query_gradients.safetensors").is_file()


def test_store_backed_exact_grad_dot_equals_autograd_one_example_at_a_time(target, oracle, tmp_path):
    run = GradientAttribution(GradientConfig(method="grad-dot", projection_rank=0, block_size=8, batch_size=5))
    out = run.run(str(target["run"]), target["train"], target["query"], tmp_path / "exact")
    ext = GradientExtractor(oracle["model"], projection_rank=0)
    bf_train = brute_force(oracle["model"], ext, oracle["train"], oracle["pad"])
    bf_query = brute_force(oracle["model"], ext, oracle["query"], oracle["pad"])
    got = torch.from_numpy(np.array(load_scores(out / "scores.safetensors")))
    want = bf_query.double() @ bf_train.double().T
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert run.scores is not None and run.scores["dim"] == ext.dim


def test_tracin_checkpoints_and_store_dtype(target, oracle, tmp_path):
    model = oracle["model"]
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    cfg = GradientConfig(method="tracin", projection_rank=8, block_size=8, batch_size=8, store_dtype="bfloat16",
                         checkpoints=[{"adapter": str(target["run"]), "lr": 1e-3},
                                      {"adapter": str(target["ckpt1"]), "lr": 5e-4}])
    loaded = LoadedModel(model=model, tokenizer=oracle["tokenizer"], spec="in-memory target")
    out = GradientAttribution(cfg).run(loaded, target["train"], target["query"], tmp_path / "tracin")
    after = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the in-memory model's adapter is restored
    _, t0, q0 = in_memory_gradients(oracle, rank=8)
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(target["ckpt1"] / "adapter_model.safetensors")))
    try:
        _, t1, q1 = in_memory_gradients(oracle, rank=8)
    finally:
        model.load_state_dict(before, strict=False)
    want = tracin_scores([q0, q1], [t0, t1], [1e-3, 5e-4])
    got = torch.from_numpy(np.array(load_scores(out / "scores.safetensors")))
    assert torch.allclose(got, want, rtol=0.03, atol=0.03 * float(want.abs().max()))  # bfloat16 storage
    assert not torch.allclose(want, tracin_scores([q0], [t0], [1e-3]), rtol=0.1)  # the second checkpoint counts
    info = json.loads((out / "shards" / f"{gradient_shard('train', 1, 0)}.json").read_text())
    assert info["tensors"]["gradients"]["dtype"] == "bfloat16"


# ---------------------------------------------------------------- resume, refusal, processes


def test_kill_and_resume_recomputes_only_missing_shards(target, tmp_path, monkeypatch):
    cfg = GradientConfig(method="if-ekfac", projection_rank=8, block_size=4, batch_size=4)
    whole = GradientAttribution(cfg)
    whole.run(str(target["run"]), target["train"], target["query"], tmp_path / "whole")
    assert len(whole.computed) == 7  # 6 train blocks and 1 query block

    class Killed(RuntimeError):
        pass

    def kill_after_two(self, name):
        if len(self.computed) == 2:
            raise Killed(name)

    monkeypatch.setattr(GradientAttribution, "_on_shard_written", kill_after_two)
    with pytest.raises(Killed):
        GradientAttribution(cfg).run(str(target["run"]), target["train"], target["query"], tmp_path / "killed")
    monkeypatch.undo()
    done = sorted(p.stem for p in (tmp_path / "killed" / "shards").glob("*-c0-*.json"))
    assert len(done) == 2 and not (tmp_path / "killed" / "scores.safetensors").exists()
    resumed = GradientAttribution(cfg)
    resumed.run(str(target["run"]), target["train"], target["query"], tmp_path / "killed")
    assert sorted(resumed.computed) == sorted(set(whole.computed) - set(done))
    a = load_scores(tmp_path / "whole" / "scores.safetensors")
    b = load_scores(tmp_path / "killed" / "scores.safetensors")
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))
    # a corrupted shard is detected by its checksum, deleted and recomputed on the next run
    shard = tmp_path / "killed" / "shards" / f"{gradient_shard('train', 0, 2)}.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    again = GradientAttribution(cfg)
    again.run(str(target["run"]), target["train"], target["query"], tmp_path / "killed")
    assert again.computed == [gradient_shard("train", 0, 2)]


def test_mismatched_rerun_is_refused(target, tmp_path):
    out = tmp_path / "run"
    assert cli(target, out, "--set", "method=grad-dot", "--set", "projection_rank=4") == 0
    assert cli(target, out, "--set", "method=grad-dot", "--set", "projection_rank=8") == 2  # one-line error
    with pytest.raises(RunDirError, match="different model, data or config"):
        GradientAttribution(GradientConfig(projection_rank=4, block_size=8, dtype="float32")).run(
            str(target["run"]), target["query"], target["query"], out)
    assert cli(target, out, "--set", "projection_rank=8", "--overwrite") == 0


@pytest.mark.multiprocess
def test_two_processes_equal_one(target, tmp_path):
    """PCA projection (statistics merged over processes), K-FAC factors merged in block order, rank 0 scores."""
    args = ["gradients", "--model", str(target["run"]), "--train", str(target["train"]), "--query",
            str(target["query"]), *SMALL, "--set", "method=if-kfac", "--set", "projection=pca",
            "--set", "projection_rank=8"]
    assert main(["-q", *args, "--out", str(tmp_path / "p1")]) == 0
    launcher = shutil.which("accelerate")
    assert launcher, "accelerate's launcher is not on PATH"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLM_ATTR_PROGRESS": "0"}
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llm_attr", "-q", *args,
                           "--out", str(tmp_path / "p2")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metas = [json.loads(p.read_text())["meta"] for p in (tmp_path / "p2" / "shards").glob("*-c0-*.json")]
    assert {m["process_index"] for m in metas} == {0, 1}  # both processes computed blocks
    a = load_scores(tmp_path / "p1" / "scores.safetensors")
    b = load_scores(tmp_path / "p2" / "scores.safetensors")
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


# ---------------------------------------------------------------- config


def test_config_file_and_validation(tmp_path):
    cfg = load_config(GradientConfig, REPO / "configs" / "gradients.yaml")
    assert cfg == GradientConfig()
    assert cfg.method in METHODS and cfg.damping is None
    cfg = load_config(GradientConfig, None, ["method=tracin", "checkpoints=[{adapter: a, lr: 1e-3}]"])
    assert cfg.checkpoints[0].adapter == "a" and cfg.checkpoints[0].lr == 1e-3
    for bad, match in (("method=lissa", "not one of"), ("projection_rank=-1", "projection_rank"),
                       ("params=a(b", "regular expression"), ("damping=-1", "damping"),
                       ("store_dtype=int8", "not one of"), ("block_size=0", "block_size")):
        with pytest.raises(ConfigError, match=match):
            load_config(GradientConfig, None, [bad])
    with pytest.raises(ConfigError, match="params: lora"):
        load_config(GradientConfig, None, ["method=tracin", "params=mlp", "checkpoints=[{adapter: a}]"])


def test_params_pattern_on_a_plain_model_and_helpful_errors(target, tmp_path, capsys):
    # builtin:tiny has no adapter: params: lora is refused with a hint; a module pattern works
    args = ["-q", "gradients", "--model", "builtin:tiny", "--train", str(target["train"]), "--query",
            str(target["query"]), *SMALL]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "module-name pattern" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--set", r"params=layers\.1\.mlp\.down_proj$",
                 "--set", "method=grad-cos"]) == 0
    scores = load_scores(tmp_path / "b" / "scores.safetensors")
    assert scores.shape == (4, 24) and np.abs(scores).max() <= 1 + 1e-5
    assert score_run(tmp_path / "b", method="if-fisher")["dim"] == 16 * 16
    with pytest.raises(RunDirError, match="K-FAC"):
        score_run(tmp_path / "b", method="if-kfac")
