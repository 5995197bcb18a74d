"""The sharded store (atomic shards, checksums, identity checks) and chunked scoring against numpy/sklearn oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_attr.errors import RunDirError
from llm_attr.evaluation.metrics import average_precision, retrieval_metrics
from llm_attr.scoring import (
    ScoreFile,
    covariance_scores,
    load_scores,
    score_inner_products,
    self_influence,
    topk_rows,
    write_topk_table,
)
from llm_attr.store import ShardError, Store

# ---------------------------------------------------------------- scoring


@pytest.fixture
def signals():
    gen = torch.Generator().manual_seed(0)
    k, q, n = 7, 3, 11
    query = torch.randn(k, q, generator=gen, dtype=torch.float64).float()
    train = torch.randn(k, n, generator=gen, dtype=torch.float64).float()
    train[:, 4] = 2.5  # a constant column: covariance 0, correlation defined as 0
    return query, train


def test_covariance_equals_numpy_cov(signals):
    query, train = signals
    scores = covariance_scores(query, train, measure="cov")
    q, n = query.shape[1], train.shape[1]
    full = np.cov(np.concatenate([query.numpy(), train.numpy()], axis=1), rowvar=False)  # ddof 1
    assert scores.shape == (q, n) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), full[:q, q:], rtol=1e-5, atol=1e-6)


def test_correlation_equals_numpy_corrcoef(signals):
    query, train = signals
    scores = covariance_scores(query, train, measure="corr")
    q = query.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        full = np.corrcoef(np.concatenate([query.numpy(), train.numpy()], axis=1), rowvar=False)
    expected = np.nan_to_num(full[:q, q:], nan=0.0)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (scores[:, 4] == 0).all()


@pytest.mark.parametrize("measure", ["cov", "corr"])
def test_chunked_reader_equals_unchunked(signals, measure, tmp_path):
    query, train = signals
    reads = []

    def read(start, stop):
        reads.append((start, stop))
        return train[:, start:stop]

    whole = covariance_scores(query, train, measure=measure)
    sf = ScoreFile(tmp_path / "scores.safetensors", (query.shape[1], train.shape[1]), metadata={"measure": measure})
    covariance_scores(query, read, n_train=train.shape[1], measure=measure, chunk_size=3, out=sf.array)
    path = sf.commit()
    assert reads == [(0, 3), (3, 6), (6, 9), (9, 11)]
    from safetensors.torch import load_file

    on_disk = load_file(str(path))["scores"]
    assert torch.equal(on_disk, whole)
    assert np.array_equal(load_scores(path), whole.numpy())
    assert not list(tmp_path.glob(".*tmp"))


def test_covariance_rejects_bad_shapes(signals):
    query, train = signals
    with pytest.raises(ValueError, match="K >= 2"):
        covariance_scores(query[:1], train[:1])
    with pytest.raises(ValueError, match="rows"):
        covariance_scores(query, train[:3])
    with pytest.raises(ValueError, match="measure"):
        covariance_scores(query, train, measure="dot")


def test_self_influence_is_variance_over_k(signals):
    _, train = signals
    expected = np.var(train.numpy().astype(np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(self_influence(train).numpy(), expected, rtol=1e-5)
    chunked = self_influence(lambda s, e: train[:, s:e], n_train=train.shape[1], chunk_size=4)
    assert torch.equal(chunked, self_influence(train))


def test_inner_products_chunked_and_cosine():
    gen = torch.Generator().manual_seed(1)
    query, train = torch.randn(4, 6, generator=gen), torch.randn(10, 6, generator=gen)
    blocks = iter([train[:3], train[3:7], train[7:]])
    scores = score_inner_products(query, blocks, n_train=10)
    np.testing.assert_allclose(scores.numpy(), (query.double() @ train.double().T).numpy(), rtol=1e-5, atol=1e-6)
    cos = score_inner_products(query, [train], n_train=10, normalize=True)
    expected = torch.nn.functional.cosine_similarity(query[:, None], train[None], dim=-1)
    np.testing.assert_allclose(cos.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected n_train"):
        score_inner_products(query, [train[:5]], n_train=10)


def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(50) < 0.2
        y[0] = True
        s = np.round(rng.normal(size=50) + y, 1)  # rounding makes ties
        assert average_precision(s, y) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    m = retrieval_metrics(scores, [True, True, False, False], k=2)
    assert m["precision@2"] == pytest.approx(0.5) and m["chance"] == 0.5
    assert m["auprc"] == pytest.approx((1.0 + (1 / 3 + 2 / 4) / 2) / 2)


def test_topk_rows_and_table(tmp_path):
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7]], dtype=np.float32)
    values, indices = topk_rows(scores, 2)
    assert indices.tolist() == [[1, 2], [2, 0]]
    np.testing.assert_allclose(values, [[0.9, 0.5], [0.7, 0.3]])
    path = write_topk_table(tmp_path / "topk.md", ["q0", "q1"], ["a", "b", "c"], values, indices,
                            {0: "x | y", 1: "long " * 40, 2: "z"}.get)
    text = path.read_text()
    assert "| q0 | 1 | b | 0.9 |" in text and "x \\| y" in text and "…" in text


# ---------------------------------------------------------------- store


def _store(tmp_path, fp="fp-a", **kw) -> Store:
    return Store.create(tmp_path / "run", method="test", fingerprint=fp,
                        header={"ids": {"train": ["a", "b"]}, "dtype": "float32"}, **kw)


def test_shard_roundtrip_and_manifest(tmp_path):
    store = _store(tmp_path)
    rows = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    digest = store.write_shard("block-0", {"rows": rows, "idx": torch.tensor([1, 2])}, meta={"k": 0})
    assert store.is_complete("block-0") and store.missing(["block-0", "block-1"]) == ["block-1"]
    out = store.read_shard("block-0")
    assert torch.equal(out["rows"], rows) and torch.equal(out["idx"], torch.tensor([1, 2]))
    assert torch.equal(store.read_slice("block-0", "rows", 1, 3), rows[1:3])
    assert store.shard_info("block-0")["meta"] == {"k": 0}
    manifest = store.finalize(["block-0"])
    assert manifest["complete"] and manifest["shards"] == {"block-0": digest}
    assert manifest["ids"] == {"train": ["a", "b"]} and manifest["method"] == "test"
    assert Store.open(tmp_path / "run", "test").complete_shards() == ["block-0"]
    with pytest.raises(RunDirError, match="not 'daunce'"):
        Store.open(tmp_path / "run", "daunce")
    with pytest.raises(RunDirError, match="not a store"):
        Store.open(tmp_path / "nowhere")
    with pytest.raises(ShardError, match="missing"):
        store.read_shard("block-1")
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_mismatched_store_refused_then_overwritten(tmp_path):
    store = _store(tmp_path)
    store.write_shard("s", {"x": torch.zeros(2)})
    same = _store(tmp_path)  # same fingerprint: resume
    assert same.complete_shards() == ["s"]
    with pytest.raises(RunDirError, match="different model, data or config"):
        _store(tmp_path, fp="fp-b")
    fresh = _store(tmp_path, fp="fp-b", overwrite=True)
    assert fresh.complete_shards() == [] and fresh.manifest["fingerprint"] == "fp-b"


def test_corrupted_shard_is_detected_and_never_read(tmp_path, caplog):
    store = _store(tmp_path)
    store.write_shard("s0", {"x": torch.arange(100, dtype=torch.float32)})
    store.write_shard("s1", {"x": torch.ones(100)})
    path = store.shard_path("s1")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the tensor data: still a valid safetensors file, wrong numbers
    path.write_bytes(bytes(data))
    reopened = Store(store.root)  # a new process: nothing verified yet
    with pytest.raises(ShardError, match="checksum"):
        reopened.read_shard("s1")
    with caplog.at_level("WARNING"):
        assert reopened.missing(["s0", "s1"]) == ["s1"]
    assert "corrupted or torn" in caplog.text
    assert path.read_bytes() == bytes(data)  # reading never deletes: the command that writes s1 replaces it
    reopened.write_shard("s1", {"x": torch.ones(100)})
    assert reopened.missing(["s0", "s1"]) == [] and torch.equal(reopened.read_shard("s1")["x"], torch.ones(100))
    torn = store.shard_path("s0")
    torn.write_bytes(torn.read_bytes()[:40])  # truncated
    assert Store(store.root).missing(["s0"]) == ["s0"]


def test_shard_without_sidecar_is_incomplete(tmp_path):
    store = _store(tmp_path)
    store.write_shard("s", {"x": torch.zeros(3)})
    (store.root / "shards" / "s.json").unlink()  # killed between the file and its sidecar
    assert store.missing(["s"]) == ["s"] and store.complete_shards() == []
    store.write_shard("s", {"x": torch.ones(3)})
    assert torch.equal(store.read_shard("s")["x"], torch.ones(3))
    info = json.loads((store.root / "shards" / "s.json").read_text())
    assert info["tensors"]["x"] == {"shape": [3], "dtype": "float32"}
