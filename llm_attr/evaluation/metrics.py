"""Metrics of attribution quality: retrieval of known-relevant examples (AUPRC, precision@k) and LDS.

Scores follow the package convention: higher = the training example helps the query more.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ranking(scores: np.ndarray) -> np.ndarray:
    """Train indices from the highest score to the lowest (stable, so ties keep index order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AUPRC of one query: area under the precision-recall curve, tied scores grouped as scikit-learn does.

    scores: [N] float; relevant: [N] bool. Equals `sklearn.metrics.average_precision_score(relevant, scores)`;
    NaN when no example is relevant.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(relevant, dtype=bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Fraction of the top-k training examples that are relevant."""
    return float(np.asarray(relevant, dtype=bool)[_ranking(scores)[:k]].mean())


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Fraction of the relevant training examples found in the top k."""
    relevant = np.asarray(relevant, dtype=bool)
    return float(relevant[_ranking(scores)[:k]].sum() / max(relevant.sum(), 1))


def retrieval_summary(scores: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = (5, 10, 20)) -> dict:
    """Mean over queries of AUPRC, precision@k and recall@k. scores: [Q, N]; relevant: [N] or [Q, N] bool."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    relevant = np.asarray(relevant, dtype=bool)
    rel = np.broadcast_to(relevant, scores.shape)
    out = {"auprc": float(np.mean([average_precision(s, r) for s, r in zip(scores, rel, strict=True)]))}
    for k in ks:
        out[f"precision@{k}"] = float(np.mean([precision_at_k(s, r, k) for s, r in zip(scores, rel, strict=True)]))
        out[f"recall@{k}"] = float(np.mean([recall_at_k(s, r, k) for s, r in zip(scores, rel, strict=True)]))
    out["random_auprc"] = float(rel.mean())
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return float(0.0 if np.isnan(rho) else rho)


def lds(
    scores: np.ndarray,
    subsets: np.ndarray,
    outcomes: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Linear datamodeling score.

    scores: [Q, N] attribution scores; subsets: [M, N] bool, the training examples kept in retrain m;
    outcomes: [M, Q] the query's measured loss after retrain m. For each query, the Spearman correlation over the M
    retrains between the predicted helpfulness of the kept subset (sum of scores) and the *negative* loss; returns
    the mean over queries with a bootstrap 95% interval over queries, and the per-query values.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    subsets = np.asarray(subsets, dtype=np.float64)
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if subsets.shape[1] != scores.shape[1] or outcomes.shape != (subsets.shape[0], scores.shape[0]):
        raise ValueError(
            f"shapes do not fit: scores {scores.shape} [Q, N], subsets {subsets.shape} [M, N], "
            f"outcomes {outcomes.shape} [M, Q]"
        )
    predicted = subsets @ scores.T  # [M, Q]
    per_query = np.array([_spearman(predicted[:, q], -outcomes[:, q]) for q in range(scores.shape[0])])
    rng = np.random.default_rng(seed)
    boots = [per_query[rng.integers(0, len(per_query), len(per_query))].mean() for _ in range(n_bootstrap)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"lds": float(per_query.mean()), "ci95": (float(lo), float(hi)), "per_query": per_query.tolist()}


def retrieval_metrics(scores: np.ndarray, relevant: Sequence[bool] | np.ndarray,
                      k: int = 10) -> dict[str, float]:
    """Mean over query rows of AUPRC and precision@k of `relevant` train columns (e.g. poisoned examples)."""
    y = np.asarray(relevant, dtype=bool)
    aps, precs = [], []
    k = min(k, len(y))
    for i in range(scores.shape[0]):
        row = np.asarray(scores[i], dtype=np.float64)
        aps.append(average_precision(row, y))
        precs.append(precision_at_k(row, y, k) if k else float("nan"))
    return {"auprc": float(np.mean(aps)), f"precision@{k}": float(np.mean(precs)), "chance": float(y.mean())}
