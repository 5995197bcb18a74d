"""Backdoor retrieval: do a method's top-ranked training examples find the poisoned ones, and does removing them
kill the backdoor? (docs/design.md, Evaluation.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data.records import Record, load_records
from ..errors import DataError
from .compare import load_scores
from .metrics import retrieval_summary


def poisoned_mask(train_records: list[Record]) -> np.ndarray:
    """`[N]` bool from `metadata.poisoned`; `DataError` if no record says it is poisoned."""
    mask = np.array([bool(r.metadata.get("poisoned", False)) for r in train_records])
    if not mask.any():
        raise DataError("no training record has metadata.poisoned = true; backdoor retrieval needs the labels")
    return mask


def pr_curve(scores: np.ndarray, relevant: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    """Precision and recall at each rank of the mean-over-queries ranking (`scores [Q, N]`), at most `max_points`."""
    order = np.argsort(-np.atleast_2d(scores).mean(0), kind="stable")
    hits = relevant[order]
    tp = np.cumsum(hits)
    ranks = np.unique(np.linspace(1, len(hits), min(max_points, len(hits))).round().astype(int))
    return {"precision": (tp[ranks - 1] / ranks).tolist(), "recall": (tp[ranks - 1] / relevant.sum()).tolist()}


def backdoor_retrieval(runs: list[str | Path], train: str | Path, ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, Any]:
    """Per run: mean over its queries of AUPRC, precision@k, recall@k of the poisoned examples, and a PR curve."""
    train_records = load_records(train)
    train_ids = [r.id for r in train_records]
    relevant = poisoned_mask(train_records)
    out: dict[str, Any] = {"train": str(train), "n_train": len(train_ids), "n_poisoned": int(relevant.sum()),
                           "ks": list(ks), "methods": {}}
    for run in runs:
        scores = load_scores(run)
        values = scores.aligned(scores.query_ids, train_ids)
        out["methods"][scores.name] = {"run": str(run), "n_query": len(scores.query_ids),
                                       **retrieval_summary(values, relevant, ks), "pr_curve": pr_curve(values, relevant)}
    return out


def format_retrieval(result: dict[str, Any]) -> str:
    ks = result["ks"]
    head = f"{'method':<36} {'AUPRC':>7}" + "".join(f" {'P@' + str(k):>6} {'R@' + str(k):>6}" for k in ks)
    rows = [head]
    for name, m in result["methods"].items():
        rows.append(f"{name[:36]:<36} {m['auprc']:>7.3f}" + "".join(
            f" {m[f'precision@{k}']:>6.3f} {m[f'recall@{k}']:>6.3f}" for k in ks))
    chance = result["n_poisoned"] / result["n_train"]
    rows.append(f"{'random ranking (chance)':<36} {chance:>7.3f}")
    return "\n".join(rows)
