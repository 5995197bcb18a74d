"""Evaluation plumbing: LDS ground truth (masks recorded and reused, scores aligned by id), backdoor retrieval,
removal selection and study, reports, and the `llm-attr eval` / `report` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np

from llm_attr.cli import main
from llm_attr.config import load_config
from llm_attr.data.math_task import make_math
from llm_attr.evaluation.compare import evaluate_lds, load_scores
from llm_attr.evaluation.metrics import lds
from llm_attr.evaluation.retrain import (
    RetrainConfig,
    alias_overrides,
    load_ground_truth,
    retrain,
    shard_name,
    subset_mask,
)
from llm_attr.store import Store


def write_scores(run: Path, scores: np.ndarray, query_ids: list[str], train_ids: list[str], method: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    save_np({"scores": np.ascontiguousarray(scores, dtype=np.float32)}, str(run / "scores.safetensors"))
    (run / "ids.json").write_text(json.dumps({"query": query_ids, "train": train_ids}))
    if method:
        (run / "scores.json").write_text(json.dumps({"method": method}))
    return run


def fake_ground_truth(root: Path, masks: np.ndarray, outcomes: np.ndarray, train_ids, query_ids) -> Path:
    """A retrain store written by hand: 1 seed per subset, shard m holds masks[m] and outcomes[m]."""
    cfg = {"subsets": len(masks), "seeds_per_subset": 1}
    store = Store.create(root, method="retrain", fingerprint="hand", header={
        "config": cfg, "ids": {"train": train_ids, "query": query_ids}})
    for m in range(len(masks)):
        store.write_shard(shard_name(m, 0), {"mask": torch.as_tensor(masks[m]),
                                             "query_loss": torch.as_tensor(outcomes[m], dtype=torch.float32)})
    store.finalize([shard_name(m, 0) for m in range(len(masks))])
    return root


def test_subset_masks_and_config():
    m = subset_mask(0, 3, 11, 0.5)
    assert m.dtype == torch.bool and m.sum() == 6 and torch.equal(m, subset_mask(0, 3, 11, 0.5))
    assert not torch.equal(m, subset_mask(0, 4, 11, 0.5))
    assert alias_overrides(["from=final", "subsets=4"]) == ["start=final", "subsets=4"]
    assert load_config(RetrainConfig, "configs/retrain.yaml") == RetrainConfig()
    with pytest.raises(Exception, match="fraction"):
        load_config(RetrainConfig, None, {"fraction": 1.0})


def test_lds_aligns_scores_by_id_and_equals_direct_spearman(tmp_path):
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    train_ids, query_ids = [f"t{i}" for i in range(6)], ["qa", "qb"]
    masks = rng.random((8, 6)) < 0.5
    outcomes = rng.standard_normal((8, 2))
    gt = fake_ground_truth(tmp_path / "gt", masks, outcomes, train_ids, query_ids)
    scores = rng.standard_normal((2, 6))
    perm = [3, 0, 5, 1, 4, 2]
    run = write_scores(tmp_path / "m", scores[::-1][:, perm], query_ids[::-1], [train_ids[i] for i in perm])
    result = evaluate_lds(gt, [run], n_bootstrap=50)
    got = result["methods"]["m"]
    direct = [spearmanr(masks.astype(float) @ scores[q], -outcomes[:, q]).statistic for q in range(2)]
    np.testing.assert_allclose(got["per_query"], direct, rtol=1e-5)
    assert got["lds"] == pytest.approx(np.mean(direct), rel=1e-5)
    assert got["lds"] == pytest.approx(lds(scores, masks, outcomes, n_bootstrap=50)["lds"], rel=1e-5)
    assert "random" in result and -1 <= result["random"]["lds"] <= 1


@pytest.mark.usefixtures("tiny_model_dir")
def test_retrain_records_masks_and_resumes(tmp_path):
    train = make_math(8, seed=0)
    query = [{**r, "id": f"q{i}"} for i, r in enumerate(make_math(2, seed=1))]
    cfg = load_config(RetrainConfig, None, alias_overrides(
        ["from=final", "subsets=3", "max_steps=2", "batch_size=4", "lora.rank=2"]))
    out = retrain("builtin:tiny", train, query, tmp_path / "gt", cfg)
    gt = load_ground_truth(out)
    assert gt["masks"].shape == (3, 8) and gt["outcomes"].shape == (3, 2)
    for m in range(3):
        assert np.array_equal(gt["masks"][m], subset_mask(0, m, 8, 0.5).numpy())
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    retrain("builtin:tiny", train, query, tmp_path / "gt", cfg)  # resume: nothing recomputed
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    assert gt["query_ids"] == ["q0", "q1"] and gt["train_ids"] == [r["id"] for r in train]


def test_backdoor_retrieval_matches_sklearn(tmp_path):
    from sklearn.metrics import average_precision_score

    from llm_attr.data.records import save_jsonl
    from llm_attr.evaluation.backdoor import backdoor_retrieval

    records = make_math(10, seed=0)
    poisoned = np.zeros(10, dtype=bool)
    poisoned[[2, 7]] = True
    for r, p in zip(records, poisoned, strict=True):
        r["metadata"]["poisoned"] = bool(p)
    save_jsonl(records, tmp_path / "train.jsonl")
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 10))
    perm = rng.permutation(10)
    run = write_scores(tmp_path / "daunce", scores[:, perm], ["a", "b", "c"], [records[i]["id"] for i in perm])
    result = backdoor_retrieval([run], tmp_path / "train.jsonl", ks=(2,))
    m = result["methods"]["daunce"]
    assert m["auprc"] == pytest.approx(np.mean([average_precision_score(poisoned, s) for s in scores]))
    hits = [poisoned[np.argsort(-s)[:2]].sum() for s in scores]
    assert m["precision@2"] == pytest.approx(np.mean(hits) / 2)
    assert m["recall@2"] == pytest.approx(np.mean(hits) / 2)
    assert result["n_poisoned"] == 2 and m["pr_curve"]["recall"][-1] == 1.0


def test_top_k_selection():
    from llm_attr.evaluation.removal import top_k_positions

    s = np.array([[5.0, 4.0, 0.0, 1.0], [0.0, 1.0, 5.0, 4.0]])
    assert top_k_positions(s, 2, "union") == [0, 1, 2, 3]
    assert top_k_positions(s, 1, "union") == [0, 2]
    assert top_k_positions(s, 2, "mean") == [0, 1]  # all means tie at 2.5: stable order
    m = np.array([[5.0, 4.0, 0.0, 1.0], [1.0, 3.0, 3.0, 0.0]])  # means 3, 3.5, 1.5, 0.5
    assert top_k_positions(m, 1, "mean") == [1] and top_k_positions(m, 3, "mean") == [0, 1, 2]
    assert top_k_positions(np.array([[1.0, 3.0, 2.0]]), 2, "mean") == [1, 2]


@pytest.mark.usefixtures("tiny_model_dir")
def test_removal_study_per_query(tmp_path):
    from llm_attr.data.records import as_records
    from llm_attr.evaluation.compare import Scores
    from llm_attr.evaluation.removal import RemovalConfig, removal_study
    from llm_attr.finetune import FinetuneConfig, finetune
    from llm_attr.models.lora import LoraArgs

    train = make_math(8, seed=0)
    query = as_records([{**r, "id": f"q{i}"} for i, r in enumerate(make_math(2, seed=1))])
    target = finetune("builtin:tiny", train, tmp_path / "target",
                      FinetuneConfig(max_steps=2, batch_size=4, lora=LoraArgs(rank=2)))
    scores = Scores("m", np.arange(16, dtype=float).reshape(2, 8), ["q0", "q1"], [r["id"] for r in train])
    cfg = RemovalConfig(k=[1, 2], random_draws=1, max_new_tokens=4)
    result = removal_study(str(target), as_records(train), query, [scores], cfg, per_query=True)
    assert result["task"] == "math" and result["k"] == [1, 2]
    assert [e["removed"] for e in result["methods"]["m"]] == [[1, 1], [2, 2]]
    assert [e["removed"] for e in result["random"]] == [1, 2]
    for e in result["methods"]["m"] + result["random"] + [result["full"]]:
        assert 0.0 <= e["success"] <= 1.0 and np.isfinite(e["loss"])
    (tmp_path / "removal.json").write_text(json.dumps(result))
    from llm_attr.evaluation.report import write_report

    report = write_report([tmp_path / "removal.json"], tmp_path / "report")
    assert "Removal of the top-k" in report.read_text() and (tmp_path / "report" / "00_removal.png").is_file()


def test_cli_eval_lds_compare_and_report(tmp_path, capsys):
    rng = np.random.default_rng(2)
    train_ids, query_ids = [f"t{i}" for i in range(6)], ["qa", "qb", "qc"]
    gt = fake_ground_truth(tmp_path / "gt", rng.random((6, 6)) < 0.5, rng.standard_normal((6, 3)), train_ids,
                           query_ids)
    run = write_scores(tmp_path / "grad", rng.standard_normal((3, 6)), query_ids, train_ids, method="grad-dot")
    assert main(["eval", "lds", "--ground-truth", str(gt), "--scores", str(run), "--bootstrap", "20"]) == 0
    assert "random scores (baseline)" in capsys.readouterr().out
    lds_json = json.loads((gt / "lds.json").read_text())
    assert set(lds_json["methods"]) == {"grad (grad-dot)"}
    ref = tmp_path / "ref"
    ref.mkdir()
    save_np({"scores": rng.standard_normal((2, 3, 4)).astype(np.float32), "budgets": np.array([5, 10])},
            str(ref / "reference.safetensors"))
    (ref / "ids.json").write_text(json.dumps({"query": query_ids, "train": train_ids[:4]}))
    assert main(["eval", "compare", "--reference", str(ref), "--method", str(run)]) == 0
    assert "cos@5" in capsys.readouterr().out
    assert main(["report", str(gt), str(ref), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Linear datamodeling score" in text and "Agreement with further training" in text
    assert len(list((tmp_path / "report").glob("*.png"))) == 2
    assert load_scores(run).name == "grad (grad-dot)"
    assert main(["eval", "lds", "--ground-truth", str(tmp_path / "nope"), "--scores", str(run)]) == 2
