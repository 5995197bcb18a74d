"""Removal studies: drop a method's top-k training examples, retrain from the base, measure the behaviour.

`top_k_positions` turns scores into the examples to remove; `removal_study` retrains (the target's finetune
config, from its base) once per (method, k) and per random draw, and evaluates a caller's `measure` on the
retrained model. Task measures: MATH answers (`check_math` on greedy generations), IFEval instruction checks,
backdoor success (`follows_backdoor`). `llm-attr eval removal` removes per query (each query's own top-k);
`llm-attr eval backdoor --target` removes the union (or mean-score top-k) over all its triggered queries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..data.records import Record
from .compare import Scores

logger = logging.getLogger(__name__)

Selection = Literal["union", "mean"]


@dataclass
class RemovalConfig:
    """`configs/removal.yaml`: what is removed, how often at random, and how the behaviour is measured."""

    k: list[int] | None = field(default=None, metadata={"help": "removal sizes (default [5, 10, 20])"})
    random_draws: int = field(default=2, metadata={"help": "random removals of each size (the baseline), averaged"})
    selection: Literal["union", "mean"] = field(default="mean", metadata={"help": "backdoor: top-k of the mean score | union of per-query top-k"})
    seed: int = field(default=0, metadata={"help": "retraining seed (the same for every removal: only the data differs)"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation budget of the task checks"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of the loss evaluation and generation"})

    def __post_init__(self) -> None:
        self.k = self.k or [5, 10, 20]
        if any(k < 1 for k in self.k):
            raise ValueError(f"k must be >= 1, got {self.k}")


def top_k_positions(scores: np.ndarray, k: int, selection: Selection = "union") -> list[int]:
    """Training positions to remove from `scores [Q, N]`: the union over queries of each row's top k, or the
    top k of the mean row (`mean`). Ties are broken by position (stable)."""
    scores = np.atleast_2d(scores)
    if selection == "mean":
        return sorted(np.argsort(-scores.mean(0), kind="stable")[:k].tolist())
    rows = [np.argsort(-row, kind="stable")[:k] for row in scores]
    return sorted(set(np.concatenate(rows).tolist()))


def random_positions(n: int, k: int, seed: int, draw: int) -> list[int]:
    rng = np.random.default_rng([seed, draw, k])
    return sorted(rng.choice(n, k, replace=False).tolist())


def task_measure(task: Literal["math", "ifeval", "backdoor"]) -> Callable[[Record, str], bool]:
    """`success(record, generated) -> bool` for a task: the answer checker, the instruction checks, the backdoor."""
    if task == "math":
        from ..data.math_task import check_math

        return lambda r, g: check_math(g, str(r.metadata["answer"]))
    if task == "ifeval":
        from ..data.ifeval_task import check_ifeval

        return lambda r, g: check_ifeval(g, r.metadata["instructions"])["all"]
    if task == "backdoor":
        from ..data.backdoor import follows_backdoor

        return lambda r, g: follows_backdoor(g)
    raise ValueError(f"unknown task {task!r}")


def detect_task(records: list[Record]) -> str:
    """`math` / `ifeval` from the records' metadata (`task` or the fields the checkers need)."""
    meta = records[0].metadata
    if meta.get("triggered"):
        return "backdoor"
    if meta.get("task") in ("math", "ifeval"):
        return meta["task"]
    if "answer" in meta:
        return "math"
    if "instructions" in meta:
        return "ifeval"
    raise ValueError("cannot tell the task from the query metadata (need metadata.answer or .instructions)")


def evaluate_model(retrainer, queries: list[Record], success: Callable[[Record, str], bool],
                   max_new_tokens: int, batch_size: int) -> dict[str, list]:
    """Per query: loss (mean response NLL) and task success of the retrainer's current model."""
    from ..generation import generate_responses

    losses = retrainer.losses(queries, batch_size).tolist()
    generated = generate_responses(retrainer.model, retrainer.tokenizer, queries, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
    return {"loss": losses, "success": [bool(success(r, g)) for r, g in zip(queries, generated, strict=True)],
            "generated": generated}


def removal_study(target: str, train_records: list[Record], queries: list[Record], methods: list[Scores],
                  cfg: RemovalConfig, *, per_query: bool, task: str | None = None) -> dict[str, Any]:
    """Retrain without each method's top-k (and k random examples) and measure the queries.

    `per_query`: each query gets its own removal (its row's top-k) and only that query is measured on the
    retrained model (Q retrains per method and k); else one removal per method and k (`cfg.selection` over all
    queries) measured on every query. Returns `{"full": ..., "k": [...], "methods": {name: [per k]},
    "random": [per k]}`, each entry `{"loss": mean, "success": rate, "removed": n}`.
    """
    from .retrain import Retrainer

    task = task or detect_task(queries)
    success = task_measure(task)
    train_ids = [r.id for r in train_records]
    query_ids = [r.id for r in queries]
    retrainer = Retrainer(target, train_records, "base", None, None)  # the target's own finetune config
    n = len(train_records)
    t0 = time.time()

    def fit_and_measure(removed: list[int], measured: list[Record], label: str) -> dict[str, list]:
        keep = sorted(set(range(n)) - set(removed))
        retrainer.fit(keep, seed=cfg.seed, desc=label)
        return evaluate_model(retrainer, measured, success, cfg.max_new_tokens, cfg.eval_batch_size)

    def summary(per: list[dict[str, list]], removed: list[int]) -> dict[str, Any]:
        losses = [x for p in per for x in p["loss"]]
        wins = [x for p in per for x in p["success"]]
        return {"loss": float(np.mean(losses)), "success": float(np.mean(wins)), "removed": removed}

    full = fit_and_measure([], queries, "retrain: full data")
    out: dict[str, Any] = {"task": task, "target": str(target), "k": cfg.k, "per_query": per_query,
                           "n_train": n, "n_query": len(queries), "methods": {}, "random": [],
                           "full": summary([full], [])}
    sizes: dict[int, list[int]] = {k: [] for k in cfg.k}  # examples removed per k (the random baseline matches)
    for method in methods:
        aligned = method.aligned(query_ids, train_ids)
        entries = []
        for k in cfg.k:
            if per_query:
                per = [fit_and_measure(top_k_positions(aligned[q:q + 1], k), [queries[q]], f"{method.name} k={k}")
                       for q in range(len(queries))]
                entries.append(summary(per, [len(top_k_positions(aligned[q:q + 1], k)) for q in range(len(queries))]))
            else:
                removed = top_k_positions(aligned, k, cfg.selection)
                entries.append(summary([fit_and_measure(removed, queries, f"{method.name} k={k}")],
                                       [train_ids[i] for i in removed]))
                sizes[k].append(len(removed))
            logger.info("%s, k=%d: loss %.4g, success %.3f", method.name, k, entries[-1]["loss"],
                        entries[-1]["success"])
        out["methods"][method.name] = entries
    for k in cfg.k:
        size = round(float(np.mean(sizes[k]))) if sizes[k] else k  # union: as many as the methods removed
        draws = [summary([fit_and_measure(random_positions(n, size, cfg.seed, d), queries, f"random k={k}")], [])
                 for d in range(cfg.random_draws)]
        out["random"].append({"loss": float(np.mean([d["loss"] for d in draws])),
                              "success": float(np.mean([d["success"] for d in draws])), "removed": size,
                              "draws": [d["success"] for d in draws]})
        logger.info("random, k=%d: loss %.4g, success %.3f", k, out["random"][-1]["loss"],
                    out["random"][-1]["success"])
    out["seconds"] = round(time.time() - t0, 1)
    return out


def format_removal(result: dict[str, Any]) -> str:
    """Terminal table: success rate and loss after removing k examples, per method and at random."""
    ks = result["k"]
    rows = [f"{'removal':<36}" + "".join(f"{'k=' + str(k):>18}" for k in ks) + "    (success / mean query loss)",
            f"{'none (full data)':<36}" + f"{result['full']['success']:>10.3f} / {result['full']['loss']:.3f}"]
    for name, entries in list(result["methods"].items()) + [("random", result["random"])]:
        rows.append(f"{name[:36]:<36}" + "".join(f"{e['success']:>10.3f} / {e['loss']:.3f}" for e in entries))
    return "\n".join(rows)


def load_queries(path: str | Path) -> list[Record]:
    from ..data.records import load_records

    return load_records(path)
