"""Daunce: the first-order objective against autograd, resumable/parallel runs, the CLI, backdoor retrieval, and the
estimator's convergence to brute-force influence on a problem small enough to compute it exactly."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm_attr.config import load_config, save_config
from llm_attr.data.backdoor import make_backdoor_task
from llm_attr.data.records import as_records, save_jsonl
from llm_attr.data.tokenize import Example, collate, pad_id_of, tokenize_records
from llm_attr.errors import ConfigError, RunDirError
from llm_attr.evaluation.metrics import retrieval_metrics
from llm_attr.losses import forward_logits, per_example_loss
from llm_attr.methods.daunce import (
    Daunce,
    DaunceConfig,
    PerturbationModel,
    Theta0,
    load_target,
    perturbation_objective,
    perturbation_plan,
    query_run,
    response_nll_and_dot,
    response_rows,
    shard_name,
)
from llm_attr.models.lora import LoraArgs
from llm_attr.scoring import covariance_scores
from llm_attr.store import Store

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> DaunceConfig:
    """A config small enough for CI: K = 4 perturbations of 3 steps, rank-4 LoRA."""
    base = dict(perturbations=4, max_steps=3, batch_size=8, max_length=128, eval_batch_size=64,
                lora=LoraArgs(rank=4, alpha=8.0))
    return DaunceConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """48 training records (6 poisoned) and 4 triggered queries, as JSONL."""
    d = tmp_path_factory.mktemp("task")
    train, triggered, _ = make_backdoor_task(n_train=48, n_query=4, fraction=0.125, seed=1)
    save_jsonl(train, d / "train.jsonl")
    save_jsonl(triggered, d / "query.jsonl")
    return SimpleNamespace(dir=d, train=d / "train.jsonl", query=d / "query.jsonl")


@pytest.fixture(scope="module")
def full_run(task, tmp_path_factory):
    """An uninterrupted K = 4 run on builtin:tiny (the reference the other runs must reproduce)."""
    out = tmp_path_factory.mktemp("full") / "run"
    daunce = Daunce(tiny_config())
    daunce.run("builtin:tiny", task.train, task.query, out)
    assert daunce.computed == [0, 1, 2, 3]
    return out


def _scores(run: Path) -> torch.Tensor:
    return load_file(str(run / "scores.safetensors"))["scores"]


def _shards(run: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(run / "shards" / f"{shard_name(k)}.safetensors")) for k in range(4)]


# ---------------------------------------------------------------- config


def test_yaml_defaults_equal_dataclass_defaults():
    assert load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml") == DaunceConfig()


@pytest.mark.parametrize("override, match", [
    ({"perturbations": 1}, "perturbations must be >= 2"),
    ({"subsample_ratio": 0.0}, "subsample_ratio"),
    ({"subsample_ratio": 1.5}, "subsample_ratio"),
    ({"measure": "dot"}, "not one of"),
    ({"adapter": "old"}, "not one of"),
    ({"gamma": -1}, "gamma"),
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"perturbation": 3}, "unknown key"),
])
def test_config_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DaunceConfig, None, override)


def test_perturbation_plan_is_a_function_of_seed_and_k():
    a, b = perturbation_plan(3, 5, 100, 0.5), perturbation_plan(3, 5, 100, 0.5)
    assert torch.equal(a.subset, b.subset) and torch.equal(a.xi, b.xi) and a.init_seed == b.init_seed
    assert a.subset.numel() == 50 and bool((a.subset.diff() > 0).all())
    c = perturbation_plan(3, 6, 100, 0.5)
    assert not torch.equal(a.xi, c.xi) and a.order_seed != c.order_seed
    assert perturbation_plan(3, 5, 100, 1.0).subset.tolist() == list(range(100))


# ---------------------------------------------------------------- the first-order term


def test_response_rows_nll_and_first_order_term_match_dense_autograd():
    """The fused pass over response rows gives per_example_loss and ⟨f, ∂ℓ/∂f|θ₀⟩, and their joint gradient."""
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 6, 11
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64).float().requires_grad_()
    logits0 = torch.randn(b, t, v, generator=gen)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :2] = -100
    labels[1, 4:] = -100
    rows = response_rows(labels)
    probs = torch.softmax(logits0[rows[0], rows[1]], -1)
    nll, value = response_nll_and_dot(logits, lambda sl: probs[sl], rows, chunk=2)
    torch.testing.assert_close(nll, per_example_loss(logits, labels), rtol=1e-5, atol=1e-6)
    # dense: ∂ℓ_b/∂f for mean NLL over response tokens, differentiated by autograd through ℓ at logits0
    z = logits0.clone().requires_grad_()
    dl_df = torch.autograd.grad(per_example_loss(z, labels).sum(), z)[0]
    dense = (logits * dl_df).sum((1, 2))
    torch.testing.assert_close(value, dense, rtol=1e-5, atol=1e-6)
    weights, gamma = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.3, 0.2, -0.7])
    g_ours = torch.autograd.grad((gamma * nll + weights * value).sum(), logits)[0]
    g_dense = torch.autograd.grad((gamma * per_example_loss(logits, labels) + weights * dense).sum(), logits)[0]
    torch.testing.assert_close(g_ours, g_dense, rtol=1e-5, atol=1e-7)
    nll_only, zero = response_nll_and_dot(logits, None, rows, chunk=4)  # without θ₀: the loss alone
    assert torch.equal(nll_only, nll) and not zero.any()
    g_nll = torch.autograd.grad(nll_only.sum(), logits)[0]
    torch.testing.assert_close(g_nll, torch.autograd.grad(per_example_loss(logits, labels).sum(), logits)[0],
                               rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_target(task):
    model, tokenizer = load_target("builtin:tiny", "new", "cpu")
    examples, _ = tokenize_records(as_records(task.train), tokenizer, 128)
    return SimpleNamespace(model=model, tokenizer=tokenizer, examples=examples, pad_id=pad_id_of(tokenizer))


@pytest.mark.parametrize("cache_mb", [1024.0, 0.0], ids=["cached", "recomputed"])
def test_objective_is_zero_at_theta0_with_the_weighted_loss_gradient(tiny_target, cache_mb):
    """At θ₀: objective 0, and ∇[γℓ_i − w_i⟨f, ∂ℓ_i/∂f⟩] = (γ − w_i)∇ℓ_i (the first-order term's whole point)."""
    pm = PerturbationModel(tiny_target.model, "new", LoraArgs(rank=4, alpha=8.0))
    try:
        ex = tiny_target.examples[:8]
        theta0 = Theta0(pm.model, tiny_target.examples, tiny_target.pad_id, pm.reference, cache_mb, 16)
        assert theta0.cached == (cache_mb > 0)
        plan = perturbation_plan(0, 0, len(tiny_target.examples), 1.0)
        pm.reset(plan.init_seed)
        with torch.no_grad():  # B = 0 makes ∇_A vanish: give B values so every LoRA gradient is tested
            for n, p in pm.trainable.items():
                if ".lora_B." in n:
                    p.normal_(0, 1e-3)
        weights = 1 + 0.7 * (2 * plan.xi - 1)
        objective = perturbation_objective(theta0, weights, gamma=1.3)
        batch = collate(ex, tiny_target.pad_id)
        params = list(pm.trainable.values())
        with pm.reference():
            theta0_logits = forward_logits(pm.model, batch).detach()

        logits = forward_logits(pm.model, batch)
        values = objective(pm.model, batch, logits)
        g_obj = torch.autograd.grad(values.sum(), params)
        # reference: the same quantities with an explicit dense ∂ℓ/∂f at θ₀
        labels = batch["labels"]
        z = theta0_logits.clone().requires_grad_()
        dl_df = torch.autograd.grad(per_example_loss(z, labels).sum(), z)[0]
        logits = forward_logits(pm.model, batch)
        w = weights[batch["index"]]
        loss, loss0 = per_example_loss(logits, labels), per_example_loss(theta0_logits, labels)
        expected = 1.3 * (loss - loss0) - w * ((logits - theta0_logits) * dl_df).sum((1, 2))
        g_exp = torch.autograd.grad(expected.sum(), params)
        # ℓ(θ) − ℓ(θ₀) of two fp32 losses ~2 whose θ₀ side (cached) came from other batches and padding: 1e-5 is
        # the batch-invariance tolerance of the loss itself (test_losses)
        torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5)
        for a, b in zip(g_obj, g_exp, strict=True):  # θ₀'s cached softmax comes from other batches: fp32 noise
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
        # at θ₀ exactly (B = 0): objective 0 and its gradient is that of (γ − w_i)·ℓ_i
        pm.reset(plan.init_seed)
        logits = forward_logits(pm.model, batch)
        values = objective(pm.model, batch, logits)
        assert values.abs().max() < 1e-5
        g_obj = torch.autograd.grad(values.sum(), params)
        weighted = ((1.3 - w) * per_example_loss(forward_logits(pm.model, batch), labels)).sum()
        for a, b in zip(g_obj, torch.autograd.grad(weighted, params), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    finally:
        pm.model.unload()


# ---------------------------------------------------------------- runs: resume, mismatch, corruption, parallel


def test_run_writes_store_scores_and_index(full_run, task):
    manifest = Store.open(full_run, "daunce").manifest
    assert manifest["complete"] and sorted(manifest["shards"]) == [*(shard_name(k) for k in range(4)), "query-tokens"]
    assert manifest["ids"]["train"] == [r.id for r in as_records(task.train)]
    assert manifest["shapes"] == {"train_signal": [48], "query_signal": [4]}
    scores = _scores(full_run)
    assert scores.shape == (4, 48) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    ids = __import__("json").loads((full_run / "ids.json").read_text())
    assert ids["query"] == [r.id for r in as_records(task.query)] and len(ids["train"]) == 48
    assert (full_run / "topk.md").read_text().count("| query-") == 4 * 10
    shard = _shards(full_run)[0]
    assert set(shard) == {"train_loss", "train_margin", "query_loss", "query_margin", "subset", "xi",
                          "query_token_loss", "query_token_margin"}
    offsets = load_file(str(full_run / "shards" / "query-tokens.safetensors"))["offsets"].tolist()
    means = torch.stack([shard["query_token_loss"][a:b].mean() for a, b in zip(offsets, offsets[1:], strict=False)])
    torch.testing.assert_close(means, shard["query_loss"])  # the per-token rows average to the query's loss
    assert all((full_run / "adapters" / f"{k:05d}" / "adapter_model.safetensors").is_file() for k in range(4))
    # the scores are corr(margin) over k of the stored rows
    shards = _shards(full_run)
    expected = covariance_scores(torch.stack([s["query_margin"] for s in shards]),
                                 torch.stack([s["train_margin"] for s in shards]), measure="corr")
    assert torch.allclose(scores, expected, atol=1e-6)  # the run scores against its prepared (centred) signals
    assert (full_run / "prepared" / "train_margin_corr_K4.safetensors").is_file()


def test_kill_and_resume_equals_uninterrupted(full_run, task, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def killed_after_second_shard(self, k):
        if k == 1:
            raise KeyboardInterrupt("simulated kill after shard 2")

    monkeypatch.setattr(Daunce, "_on_shard_written", killed_after_second_shard)
    first = Daunce(tiny_config())
    with pytest.raises(KeyboardInterrupt):
        first.run("builtin:tiny", task.train, task.query, out)
    assert first.computed == [0, 1] and not (out / "scores.safetensors").exists()
    monkeypatch.undo()
    again = Daunce(tiny_config())
    again.run("builtin:tiny", task.train, task.query, out)
    assert again.computed == [2, 3]  # only the missing shards
    assert torch.equal(_scores(out), _scores(full_run))
    for a, b in zip(_shards(out), _shards(full_run), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_rerun_rules_mismatch_corruption_and_more_k(full_run, task, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    with pytest.raises(RunDirError, match="different model, data or config"):
        Daunce(tiny_config(learning_rate=5e-4)).run("builtin:tiny", task.train, task.query, out)
    with pytest.raises(RunDirError, match="different model, data or config"):
        Daunce(tiny_config()).run("builtin:tiny", task.query, task.query, out)
    # scoring-only keys may change: nothing recomputed, scores rewritten
    same = Daunce(tiny_config(measure="cov", signal="loss"))
    same.run("builtin:tiny", task.train, task.query, out)
    assert same.computed == []
    shards = _shards(full_run)
    expected = covariance_scores(torch.stack([s["query_loss"] for s in shards]),
                                 torch.stack([s["train_loss"] for s in shards]), measure="cov")
    assert torch.allclose(_scores(out), expected, atol=1e-6)
    # a corrupted shard is detected, logged and recomputed (identically)
    path = out / "shards" / f"{shard_name(1)}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))
    fixed = Daunce(tiny_config())
    with caplog.at_level("WARNING"):
        fixed.run("builtin:tiny", task.train, task.query, out)
    assert fixed.computed == [1] and "corrupted or torn" in caplog.text
    assert torch.equal(_scores(out), _scores(full_run))
    # more perturbations: only the new ones are computed; --overwrite starts again
    more = Daunce(tiny_config(perturbations=5))
    more.run("builtin:tiny", task.train, task.query, out)
    assert more.computed == [4] and _scores(out).shape == (4, 48)
    fresh = Daunce(tiny_config(perturbations=2, learning_rate=5e-4))
    fresh.run("builtin:tiny", task.train, task.query, out, overwrite=True)
    assert fresh.computed == [0, 1] and not (out / "adapters" / "00004").exists()


def test_cli_score_self_and_query_reproduce_the_run(full_run, task, tmp_path, capsys):
    from llm_attr.cli import main

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    assert main(["score", str(run), "--measure", "cov", "--signal", "loss", "--perturbations", "3"]) == 0
    shards = _shards(full_run)[:3]
    expected = covariance_scores(torch.stack([s["query_loss"] for s in shards]),
                                 torch.stack([s["train_loss"] for s in shards]), measure="cov")
    assert torch.allclose(_scores(run), expected, atol=1e-6)
    assert main(["score", str(run), "--self"]) == 0
    var = load_file(str(run / "self_influence.safetensors"))["self_influence"]
    margins = torch.stack([s["train_margin"] for s in _shards(full_run)]).double()
    torch.testing.assert_close(var, margins.var(0).float())
    assert "variance" in capsys.readouterr().out
    assert main(["score", str(run), "--perturbations", "9"]) == 2  # missing shards: a one-line error
    # query: K forward passes with the kept adapters reproduce the stored query rows and the scores
    info = query_run(run, task.query, tmp_path / "q")
    stored = torch.stack([s["query_margin"] for s in _shards(full_run)])
    fresh = load_file(str(tmp_path / "q" / "query_signals.safetensors"))["margin"]
    torch.testing.assert_close(fresh, stored, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_scores(tmp_path / "q"), _scores(full_run), rtol=1e-3, atol=1e-4)
    assert info["perturbations"] == 4 and (tmp_path / "q" / "topk.md").is_file()


def test_adapter_continue_trains_the_targets_own_adapter(task, tmp_path):
    from llm_attr.finetune import FinetuneConfig, finetune

    target = finetune("builtin:tiny", task.train, tmp_path / "target",
                      FinetuneConfig(max_steps=4, batch_size=8, learning_rate=1e-3, max_length=128,
                                     lora=LoraArgs(rank=4, alpha=8.0)))
    model, tokenizer = load_target(str(target), "continue", "cpu")
    pm = PerturbationModel(model, "continue", LoraArgs())
    batch = collate(tokenize_records(as_records(task.query), tokenizer, 128)[0], pad_id_of(tokenizer))
    before = forward_logits(pm.model, batch).detach()
    with torch.no_grad():
        for p in pm.trainable.values():
            p.add_(0.05)
    assert not torch.allclose(forward_logits(pm.model, batch), before)
    with torch.no_grad(), pm.reference():  # θ₀ = the target's trained adapter, swapped in
        torch.testing.assert_close(forward_logits(pm.model, batch), before)
    daunce = Daunce(tiny_config(adapter="continue", perturbations=2))
    run = daunce.run(str(target), task.train, task.query, tmp_path / "run")
    assert daunce.computed == [0, 1] and torch.isfinite(_scores(run)).all()
    info = query_run(run, task.query, tmp_path / "q")
    stored = torch.stack([load_file(str(run / "shards" / f"{shard_name(k)}.safetensors"))["query_margin"]
                          for k in range(2)])
    fresh = load_file(str(tmp_path / "q" / "query_signals.safetensors"))["margin"]
    torch.testing.assert_close(fresh, stored, rtol=1e-4, atol=1e-5)
    assert info["perturbations"] == 2


@pytest.mark.multiprocess
def test_two_processes_equal_one(full_run, task, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: each process writes its shards; same result."""
    config = tmp_path / "daunce.yaml"
    save_config(tiny_config(), config)
    out = tmp_path / "p2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "llm_attr", "daunce", "--model", "builtin:tiny", "--train", str(task.train),
           "--query", str(task.query), "--out", str(out), "--config", str(config)]
    env = {**os.environ, "LLM_ATTR_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    writers = {Store(out).shard_info(shard_name(k))["meta"]["process_index"] for k in range(4)}
    assert writers == {0, 1}
    for a, b in zip(_shards(out), _shards(full_run), strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_scores(out), _scores(full_run), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- backdoor retrieval


@pytest.fixture(scope="module")
def backdoor(tmp_path_factory):
    """The demo's backdoor target (240 records, 5% poisoned) fine-tuned until it follows the trigger."""
    from llm_attr.demo import target_config
    from llm_attr.finetune import finetune

    d = tmp_path_factory.mktemp("backdoor")
    train, triggered, _ = make_backdoor_task(n_train=240, n_query=32, fraction=0.05, seed=0)
    save_jsonl(train, d / "train.jsonl")
    save_jsonl(triggered, d / "query.jsonl")
    target = finetune("builtin:tiny", d / "train.jsonl", d / "target", target_config())
    poisoned = [bool(r["metadata"]["poisoned"]) for r in train]
    return SimpleNamespace(dir=d, target=target, train=d / "train.jsonl", query=d / "query.jsonl", poisoned=poisoned)


def _backdoor_auprc(backdoor, out: Path, config: DaunceConfig) -> dict:
    Daunce(config).run(str(backdoor.target), backdoor.train, backdoor.query, out, top_k=12)
    return retrieval_metrics(_scores(out), backdoor.poisoned, k=12)


def test_backdoor_poisoned_examples_rank_well_above_chance(backdoor, tmp_path):
    """CI version: the default config with K = 8."""
    cfg = load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml", {"perturbations": 8})
    m = _backdoor_auprc(backdoor, tmp_path / "run", cfg)
    assert m["chance"] == pytest.approx(0.05)
    assert m["auprc"] > 4 * m["chance"] and m["precision@12"] > 3 * m["chance"], m


def test_backdoor_newton_steps_on_the_targets_adapter(backdoor, tmp_path):
    """`solver: newton` on the target's own adapter (K-FAC Newton steps from θ₀), K = 16: the planted poison ranks
    at the top (measured 0.99; AdamW perturbations at K = 16: 0.78)."""
    cfg = load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml",
                      {"perturbations": 16, "solver": "newton", "adapter": "continue", "keep_adapters": False})
    m = _backdoor_auprc(backdoor, tmp_path / "run", cfg)
    assert m["auprc"] >= 0.9, m


@pytest.mark.slow
def test_backdoor_default_config_reaches_auprc_08(backdoor, tmp_path):
    """Done-when of issue 4: default settings, K <= 32, AUPRC >= 0.8 at a 5% poison rate."""
    cfg = load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml")
    assert cfg.perturbations <= 32
    m = _backdoor_auprc(backdoor, tmp_path / "run", cfg)
    assert m["auprc"] >= 0.8, m


# ---------------------------------------------------------------- convergence to brute-force influence


class LogisticLM(torch.nn.Module):
    """Logistic regression as a causal LM: input token i carries features x_i; position 0's logits `W x_i` predict
    the label token at position 1 (the response). Lets Daunce's objective and scoring code run unchanged."""

    def __init__(self, features: torch.Tensor, n_classes: int = 2):
        super().__init__()
        self.register_buffer("features", features)
        self.head = torch.nn.Linear(features.shape[1], n_classes, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.head(self.features[input_ids]))


def _minimise(model: torch.nn.Module, objective, iters: int) -> None:
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)


def daunce_vs_influence(ks: tuple[int, ...] = (4, 16, 256)) -> dict[int, float]:
    """Mean over queries of corr(Daunce covariance scores, exact influence g_qᵀ H⁻¹ g_j) at each K.

    Well-specified L2-regularised logistic regression (so Fisher ≈ Hessian), max(ks) perturbations; the value at a
    smaller K is averaged over the max(ks) // K disjoint blocks of K perturbations (its expectation, not one draw).
    """
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(0)
        n, n_query, d, lam = 120, 8, 3, 1e-2
        x = rng.normal(size=(n + n_query, d))
        y = (rng.random(n + n_query) < 1 / (1 + np.exp(-x @ (1.5 * rng.normal(size=d))))).astype(int)
        examples = [Example(index=i, id=str(i), input_ids=[i, int(y[i])], labels=[-100, int(y[i])])
                    for i in range(n + n_query)]
        train, query = examples[:n], [Example(j, e.id, e.input_ids, e.labels) for j, e in enumerate(examples[n:])]
        model = LogisticLM(torch.tensor(x))
        batch, qbatch = collate(train, 0), collate(query, 0)

        def regularised(objective_values):
            return objective_values.mean() + lam / 2 * model.head.weight.pow(2).sum()

        _minimise(model, lambda: regularised(per_example_loss(forward_logits(model, batch), batch["labels"])), 100)
        w0 = model.head.weight.detach().clone()

        # brute force: influence = g_q^T H^-1 g_j, H the Hessian of the regularised training objective
        def losses_at(w: torch.Tensor, b: dict) -> torch.Tensor:
            return per_example_loss(model.features[b["input_ids"]] @ w.reshape(2, d).T, b["labels"])

        jac = torch.autograd.functional.jacobian
        g_train = jac(lambda w: losses_at(w, batch), w0.reshape(-1))
        g_query = jac(lambda w: losses_at(w, qbatch), w0.reshape(-1))
        hessian = torch.autograd.functional.hessian(
            lambda w: losses_at(w, batch).mean() + lam / 2 * w.pow(2).sum(), w0.reshape(-1))
        influence = g_query @ torch.linalg.solve(hessian, g_train.T)

        # Daunce: K minimisers of the perturbed objective (the package's objective and θ₀ cache), then covariance
        theta0 = Theta0(model, train, 0, contextlib.nullcontext, cache_mb=64, batch_size=n)
        train_rows, query_rows = [], []
        for k in range(max(ks)):
            plan = perturbation_plan(0, k, n, 1.0)
            objective = perturbation_objective(theta0, 1 + (2 * plan.xi.double() - 1), gamma=1.0)
            with torch.no_grad():
                model.head.weight.copy_(w0)
            _minimise(model, lambda obj=objective: regularised(obj(model, batch, forward_logits(model, batch))), 15)
            with torch.no_grad():
                train_rows.append(per_example_loss(forward_logits(model, batch), batch["labels"]))
                query_rows.append(per_example_loss(forward_logits(model, qbatch), qbatch["labels"]))
        train_rows, query_rows = torch.stack(train_rows), torch.stack(query_rows)
        corr = {}
        for k in ks:
            blocks = []
            for start in range(0, max(ks) - k + 1, k):
                scores = covariance_scores(query_rows[start:start + k], train_rows[start:start + k]).double()
                blocks.append(np.mean([np.corrcoef(scores[i], influence[i])[0, 1] for i in range(n_query)]))
            corr[k] = float(np.mean(blocks))
    finally:
        torch.set_default_dtype(dtype)
    return corr


def test_daunce_converges_to_brute_force_influence():
    """Daunce's scores correlate with the brute-force influence increasingly with K, above 0.9 at K = 256."""
    corr = daunce_vs_influence((4, 16, 256))
    assert corr[4] < corr[16] < corr[256], corr
    assert corr[256] > 0.9, corr
