"""Further-training reference: pairing by seed, the paired difference, a first-order hand case, the comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file

from llm_attr.config import load_config
from llm_attr.data.math_task import make_math
from llm_attr.methods.further_training import (
    FurtherTraining,
    FurtherTrainingConfig,
    reference_scores,
    run_seeds,
    shard_name,
)
from llm_attr.store import Store

pytestmark = pytest.mark.usefixtures("tiny_model_dir")


@pytest.fixture(scope="module")
def data():
    train = make_math(8, seed=0)
    query = [{**r, "id": f"q{i}"} for i, r in enumerate(make_math(3, seed=1))]
    return train, query


def config(**kw) -> FurtherTrainingConfig:
    base = {"seeds": 2, "budgets": [1, 3], "batch_size": 3, "learning_rate": 0.05, "lora": {"rank": 2}}
    return load_config(FurtherTrainingConfig, None, {**base, **kw})


def test_yaml_matches_the_dataclass_and_validation():
    assert load_config(FurtherTrainingConfig, "configs/further_training.yaml") == FurtherTrainingConfig()
    with pytest.raises(Exception, match="budgets"):
        config(budgets=[3, 1])
    assert config(budgets=[2, 5]).max_steps == 5


def test_pairing_by_seed_and_the_paired_difference(data, tmp_path):
    train, query = data
    ids = [train[2]["id"], train[5]["id"]]
    both = FurtherTraining(config(leave_out_ids=ids)).run("builtin:tiny", train, query, tmp_path / "both")
    one = FurtherTraining(config(leave_out_ids=ids[1:])).run("builtin:tiny", train, query, tmp_path / "one")
    sa, sb = Store.open(both), Store.open(one)
    for s in range(2):  # same seed => the full-data run and the j-run do not depend on which other j are computed
        for name in (shard_name(s, None), shard_name(s, 5)):
            assert torch.equal(sa.read_shard(name)["query_loss"], sb.read_shard(name)["query_loss"])
    # different seeds give different runs (order and init differ)
    assert not torch.equal(sa.read_shard("s0_full")["query_loss"], sa.read_shard("s1_full")["query_loss"])
    ref = load_file(str(both / "reference.safetensors"))
    assert ref["scores"].shape == (2, 3, 2) and ref["budgets"].tolist() == [1, 3]
    for b in range(2):
        for jj, j in enumerate((2, 5)):
            want = np.mean([(sa.read_shard(shard_name(s, j))["query_loss"][b]
                             - sa.read_shard(shard_name(s, None))["query_loss"][b]).numpy() for s in range(2)], 0)
            np.testing.assert_allclose(ref["scores"][b, :, jj].numpy(), want, rtol=1e-5, atol=1e-7)
    ids_json = json.loads((both / "ids.json").read_text())
    assert ids_json == {"query": ["q0", "q1", "q2"], "train": ids}
    np.testing.assert_allclose(load_file(str(both / "scores.safetensors"))["scores"], ref["scores"][-1])
    centred = reference_scores(sa, centre=True)["scores"]
    np.testing.assert_allclose(centred.sum(-1).numpy(), 0.0, atol=1e-7)
    # resume: nothing recomputed
    again = FurtherTraining(config(leave_out_ids=ids))
    again.run("builtin:tiny", train, query, tmp_path / "both")
    assert again.computed == []
    # `llm-attr score` of a further-training store writes its reference again from the shards
    from llm_attr.cli import main

    (both / "reference.safetensors").unlink()
    (both / "scores.safetensors").unlink()
    assert main(["score", str(both)]) == 0
    np.testing.assert_allclose(load_file(str(both / "reference.safetensors"))["scores"], ref["scores"])
    np.testing.assert_allclose(load_file(str(both / "scores.safetensors"))["scores"], ref["scores"][-1])
    assert main(["score", str(both), "--measure", "cov"]) == 2  # an option of another method: refused by name


@pytest.mark.parametrize("removal", ["exclude", "reweight"])
def test_one_full_batch_sgd_step_is_the_scaled_gradient_inner_product(data, tmp_path, removal):
    """One SGD step on the whole batch, no clipping: τ(j → z) = (η/N) ⟨∇ℓ_z, ∇ℓ_j⟩ + O(η²) at the fresh adapter."""
    from llm_attr.data.records import as_records
    from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
    from llm_attr.losses import forward_logits, per_example_loss
    from llm_attr.methods.daunce import PerturbationModel, load_target

    train, query = data
    n, lr = len(train), 1e-3
    cfg = config(seeds=1, budgets=[1], batch_size=n, learning_rate=lr, removal=removal, leave_out=0)
    run = FurtherTraining(cfg).run("builtin:tiny", train, query, tmp_path / removal)
    tau = load_file(str(run / "reference.safetensors"))["scores"][0].double()  # [Q, N]

    net, tok = load_target("builtin:tiny", "new", "cpu")
    pm = PerturbationModel(net, "new", cfg.lora)
    pm.reset(run_seeds(cfg.seed, 0)[1])
    params = list(pm.trainable.values())

    def grad(record) -> torch.Tensor:
        (ex,), _ = tokenize_records(as_records([record]), tok, 512)
        batch = collate([ex], pad_id_of(tok))
        loss = per_example_loss(forward_logits(pm.model, batch), batch["labels"]).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    g_train = torch.stack([grad(r) for r in train])
    g_query = torch.stack([grad(r) for r in query])
    expected = lr / n * g_query @ g_train.T
    assert expected.abs().max() > 1e-5
    np.testing.assert_allclose(tau.numpy(), expected.numpy(), rtol=0.05, atol=0.02 * expected.abs().max().item())


def test_compare_aligns_by_id_and_matches_direct_cosine_and_spearman(tmp_path):
    from scipy.stats import spearmanr

    from llm_attr.evaluation.compare import compare_with_reference

    rng = np.random.default_rng(0)
    tau = rng.standard_normal((2, 3, 5)).astype(np.float32)  # [B, Q, J]
    ref = tmp_path / "ref"
    ref.mkdir()
    save_np({"scores": tau, "budgets": np.array([10, 20])}, str(ref / "reference.safetensors"))
    left_out = [f"t{j}" for j in (1, 3, 4, 6, 7)]
    (ref / "ids.json").write_text(json.dumps({"query": ["a", "b", "c"], "train": left_out}))
    # a method scored on all 8 training examples, queries in another order
    full = rng.standard_normal((3, 8)).astype(np.float32)
    meth = tmp_path / "meth"
    meth.mkdir()
    q_order, t_order = ["c", "a", "b"], [f"t{j}" for j in (7, 0, 1, 2, 3, 4, 5, 6)]
    stored = np.ascontiguousarray(full[[2, 0, 1]][:, [7, 0, 1, 2, 3, 4, 5, 6]])  # safetensors saves raw memory
    save_np({"scores": stored}, str(meth / "scores.safetensors"))
    (meth / "ids.json").write_text(json.dumps({"query": q_order, "train": t_order}))
    result = compare_with_reference(ref, [meth])
    entry = result["methods"]["meth"]
    cols = [1, 3, 4, 6, 7]
    for b in range(2):
        cos = [full[q, cols] @ tau[b, q] / np.linalg.norm(full[q, cols]) / np.linalg.norm(tau[b, q]) for q in range(3)]
        rho = [spearmanr(full[q, cols], tau[b, q]).statistic for q in range(3)]
        assert entry["cosine"][b][0] == pytest.approx(np.mean(cos), abs=1e-6)
        assert entry["cosine"][b][1] == pytest.approx(np.std(cos, ddof=1) / np.sqrt(3), abs=1e-6)
        assert entry["spearman"][b][0] == pytest.approx(np.mean(rho), abs=1e-6)
    assert Path(meth).is_dir()
