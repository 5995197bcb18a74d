"""Read any run's scores aligned by ids, and compare methods: with the further-training reference, and by LDS.

Every scoring command writes `RUN/scores.safetensors` (`scores [Q, N]` float32) and `RUN/ids.json`
(`{"query": [...], "train": [...]}`); this module only ever aligns them by id, never by position.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RunDirError

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """A method's scores: `values [Q, N]` float64, with the query and train ids of its rows and columns."""

    name: str
    values: np.ndarray
    query_ids: list[str]
    train_ids: list[str]

    def aligned(self, query_ids: list[str], train_ids: list[str]) -> np.ndarray:
        """`[len(query_ids), len(train_ids)]`: the rows and columns of these ids; `RunDirError` if one is absent."""
        rows, cols = _positions(self.query_ids, query_ids, self.name, "query"), _positions(
            self.train_ids, train_ids, self.name, "train")
        return self.values[np.ix_(rows, cols)]


def _positions(have: list[str], want: list[str], name: str, what: str) -> list[int]:
    where = {rid: i for i, rid in enumerate(have)}
    missing = [r for r in want if r not in where]
    if missing:
        raise RunDirError(f"{name}: its scores have no {what} id(s) {missing[:5]} (of {len(missing)} missing); "
                          f"score the same {what} records")
    return [where[r] for r in want]


def method_name(run: Path) -> str:
    """`dirname (method)` from RUN/scores.json when it says which method scored it, else the directory name."""
    info_path = run / "scores.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        label = info.get("method") or info.get("measure")
        if label and label not in run.name:
            return f"{run.name} ({label})"
    return run.name


def measurement(run: str | Path) -> str:
    """The query measurement a run's latest scoring is of (`query_span` in RUN/scores.json; `response` if none)."""
    info_path = Path(run) / "scores.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return "per-token" if info.get("per_token") else info.get("query_span") or "response"
    return "response"


def _same_measurement(run: str | Path, truth: str | Path, truth_span: str, what: str) -> None:
    mine = measurement(run)
    if mine != truth_span:
        raise RunDirError(f"{run}: its scores measure the queries on {mine!r} but the {what} {truth} measures "
                          f"them on {truth_span!r}; score both with the same --query-span")


def load_scores(run: str | Path, name: str | None = None) -> Scores:
    """The scores of a run directory (or a directory written by `llm-attr query`)."""
    from safetensors.numpy import load_file

    run = Path(run)
    path, ids_path = run / "scores.safetensors", run / "ids.json"
    if not path.is_file() or not ids_path.is_file():
        raise RunDirError(f"{run}: no scores.safetensors + ids.json; score the run first (`llm-attr score {run}`)")
    ids = json.loads(ids_path.read_text())
    values = load_file(str(path))["scores"].astype(np.float64)
    if values.shape != (len(ids["query"]), len(ids["train"])):
        raise RunDirError(f"{run}: scores {values.shape} do not match ids.json ({len(ids['query'])} queries, "
                          f"{len(ids['train'])} training examples)")
    return Scores(name or method_name(run), values, ids["query"], ids["train"])


def mean_sem(values: np.ndarray) -> tuple[float, float]:
    """(mean, standard error of the mean) of a 1-D array, ignoring NaN; s.e.m. 0 for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), sem


def row_similarity(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `a, b [Q, J]`: (cosine `[Q]`, Spearman `[Q]`); NaN where a row is constant (undefined)."""
    from scipy.stats import spearmanr

    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    spear = np.full(a.shape[0], np.nan)
    for q in range(a.shape[0]):
        if np.ptp(a[q]) > 0 and np.ptp(b[q]) > 0:
            spear[q] = spearmanr(a[q], b[q]).statistic
    return cosine, spear


def compare_with_reference(reference: str | Path, runs: list[str | Path]) -> dict[str, Any]:
    """Per method and budget: cosine and Spearman with the further-training τ over the left-out examples.

    Returns `{"budgets": [...], "methods": {name: {"cosine": [[mean, sem] per budget], "spearman": ...,
    "per_query_cosine": [[Q] per budget]}}}`.
    """
    from safetensors.numpy import load_file

    reference = Path(reference)
    ref_file = reference / "reference.safetensors"
    if not ref_file.is_file():
        raise RunDirError(f"{reference}: no reference.safetensors; run `llm-attr further-train` to completion")
    ref = load_file(str(ref_file))
    ids = json.loads((reference / "ids.json").read_text())
    tau = ref["scores"].astype(np.float64)  # [B, Q, J]
    budgets = ref["budgets"].tolist()
    out: dict[str, Any] = {"reference": str(reference), "budgets": budgets, "n_query": len(ids["query"]),
                           "n_left_out": len(ids["train"]), "methods": {}}
    for run in runs:
        _same_measurement(run, reference, measurement(reference), "further-training reference")
        scores = load_scores(run)
        method = scores.aligned(ids["query"], ids["train"])
        entry: dict[str, Any] = {"run": str(run), "cosine": [], "spearman": [], "per_query_cosine": []}
        for b in range(len(budgets)):
            cosine, spear = row_similarity(method, tau[b])
            entry["cosine"].append(list(mean_sem(cosine)))
            entry["spearman"].append(list(mean_sem(spear)))
            entry["per_query_cosine"].append(cosine.tolist())
        out["methods"][scores.name] = entry
    return out


def format_compare(result: dict[str, Any]) -> str:
    """Terminal table: one row per method, cosine (± s.e.m.) per budget, then Spearman."""
    budgets = result["budgets"]
    head = f"{'method':<32}" + "".join(f"{'cos@' + str(b):>16}" for b in budgets) + "".join(
        f"{'rho@' + str(b):>16}" for b in budgets)
    rows = [head]
    for name, e in result["methods"].items():
        cells = [f"{m:+.3f}±{s:.3f}" for m, s in e["cosine"]] + [f"{m:+.3f}±{s:.3f}" for m, s in e["spearman"]]
        rows.append(f"{name[:32]:<32}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(rows)


# ---------------------------------------------------------------------- LDS


def evaluate_lds(ground_truth: str | Path, runs: list[str | Path], *, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """LDS of each run's scores against a `llm-attr retrain` store, plus a random-score baseline.

    Scores are aligned to the store's query and train ids; each run's scores must measure the queries as the
    store's losses do (its `query_span`), else `RunDirError` naming both.
    Returns `{"methods": {name: lds dict}, "random": ...}`.
    """
    from .metrics import lds
    from .retrain import load_ground_truth

    gt = load_ground_truth(ground_truth)
    out: dict[str, Any] = {"ground_truth": str(ground_truth), "subsets": int(gt["masks"].shape[0]),
                           "n_query": len(gt["query_ids"]), "n_train": len(gt["train_ids"]),
                           "query_span": gt["query_span"], "methods": {}}
    for run in runs:  # the retrained losses are of one measurement (`llm-attr retrain --query-span`)
        _same_measurement(run, ground_truth, gt["query_span"], "LDS ground truth")
        scores = load_scores(run)
        values = scores.aligned(gt["query_ids"], gt["train_ids"])
        out["methods"][scores.name] = {"run": str(run), **lds(values, gt["masks"], gt["outcomes"],
                                                                n_bootstrap=n_bootstrap, seed=seed)}
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(gt["query_ids"]), len(gt["train_ids"])))
    out["random"] = lds(noise, gt["masks"], gt["outcomes"], n_bootstrap=n_bootstrap, seed=seed)
    return out


def format_lds(result: dict[str, Any]) -> str:
    rows = [f"{'method':<40} {'LDS':>8}  {'95% CI':>18}"]
    items = list(result["methods"].items()) + [("random scores (baseline)", result["random"])]
    for name, r in items:
        lo, hi = r["ci95"]
        rows.append(f"{name[:40]:<40} {r['lds']:>+8.3f}  [{lo:+.3f}, {hi:+.3f}]")
    return "\n".join(rows)
