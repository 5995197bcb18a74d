"""Studies (b) and (c): most-influential-subset removal on a real model (default SmolLM2-135M-Instruct).

    python recipes/real_removal.py --task math   --work runs/math_removal      # every stage, resumable
    python recipes/real_removal.py --task ifeval --work runs/ifeval_removal
    accelerate launch --multi_gpu --num_processes 2 recipes/real_removal.py --task math --work W   # methods on 2

1. data: `--n-train` training records and a pool of held-out queries of the built-in task (MATH: one-step word
   problems with `\\boxed{}` answers, `--templates all` for every kind; IFEval: verifiable instructions).
2. target: a rank-16 LoRA fine-tune of the last 12 decoder layers (`--target-set key=value` overrides; with
   `lora.layers` the frozen bottom of the model is computed once per example, models/prefix_cache.py).
3. queries: the target's greedy answers to the pool are checked (math_task.check_math / ifeval_task.check_ifeval);
   the passing queries form groups (MATH: problem kind; IFEval: first instruction's type) and the `--groups`
   largest, `--per-group` queries each, are attributed.
4. methods: Daunce (configs/daunce.yaml + `--daunce-set`), grad-cos, if-ekfac, each over all selected queries.
5. removal: for every group, method and k, the top-k training examples of the group's mean score are removed and
   the target's config retrained from the base (one seed, the same for every removal: only the data differs);
   `--random-draws` random removals of the same k are the baseline. A reference retrain on all the data, same
   seed, defines which queries pass before removal.
6. figures: per method and k, the fraction of the queries passing under the reference that fail after removal
   (flips) and the mean increase of their response loss, each with a 95% bootstrap interval over queries;
   written to `--json` and printed.

Every retrain's outcome is kept in WORK/removal/<label>.json, so a killed run resumes at the next one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import build_target, is_main, method_scores, run_method, wait_for  # noqa: E402

from llm_attr.data.records import load_records, save_jsonl  # noqa: E402
from llm_attr.utils import setup_logging  # noqa: E402

logger = logging.getLogger("real_removal")

TARGET = {"epochs": 3.0, "learning_rate": 1e-3, "batch_size": 16, "max_length": 128, "group_by_length": True,
          "lora": {"rank": 16, "alpha": 32.0, "layers": 12}, "save_steps": 0}
METHODS = ("daunce", "grad-cos", "if-ekfac")
MAX_NEW_TOKENS = {"math": 32, "ifeval": 48}


def build_data(task: str, work: Path, n_train: int, n_pool: int, seed: int, templates: str) -> dict[str, Path]:
    paths = {"train": work / "train.jsonl", "pool": work / "pool.jsonl"}
    if is_main() and not all(p.is_file() for p in paths.values()):
        if task == "math":
            from llm_attr.data.math_task import ONE_STEP, make_math

            kinds = None if templates == "all" else ONE_STEP if templates == "one-step" else templates.split(",")
            records = make_math(n_train + n_pool, seed=seed, templates=kinds)
        else:
            from llm_attr.data.ifeval_task import make_ifeval

            records = make_ifeval(n_train + n_pool, seed=seed)
        save_jsonl(records[:n_train], paths["train"])
        save_jsonl(records[n_train:], paths["pool"])
    wait_for(list(paths.values()))
    return paths


def group_of(task: str, record) -> str:
    if task == "math":
        return record.metadata["template"]
    return record.metadata["instructions"][0]["type"]


def select_queries(task: str, target: Path, paths: dict[str, Path], work: Path, groups: int, per_group: int) -> dict:
    """The target's passing pool queries, grouped; the `groups` largest groups (`per_group` each) are kept."""
    out = work / "queries.json"
    if out.exists():
        return json.loads(out.read_text())
    from llm_attr.evaluation.removal import task_measure
    from llm_attr.generation import generate_responses
    from llm_attr.models.loading import load_model

    loaded = load_model(str(target))
    pool = list(load_records(paths["pool"]))
    generated = generate_responses(loaded.model, loaded.tokenizer, pool, max_new_tokens=MAX_NEW_TOKENS[task])
    success = task_measure(task)
    passed = [r for r, g in zip(pool, generated, strict=True) if success(r, g)]
    by_group: dict[str, list[str]] = defaultdict(list)
    for r in passed:
        by_group[group_of(task, r)].append(r.id)
    chosen = sorted(by_group, key=lambda g: (-len(by_group[g]), g))[:groups]
    selected = {g: by_group[g][:per_group] for g in chosen}
    ids = {i for v in selected.values() for i in v}
    save_jsonl([r for r in pool if r.id in ids], work / "query.jsonl")
    result = {"pass_rate": len(passed) / len(pool), "n_pool": len(pool), "groups": selected,
              "group_sizes": {g: len(v) for g, v in by_group.items()}, "examples": generated[:3]}
    out.write_text(json.dumps(result, indent=1))
    return result


class Removals:
    """Retrains of the target's config without chosen training examples; each outcome kept in WORK/removal/."""

    def __init__(self, task: str, target: Path, train: list, queries: dict, work: Path, seed: int):
        self.task, self.target, self.train, self.queries, self.seed = task, target, train, queries, seed
        self.dir = work / "removal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._retrainer = None

    def outcome(self, label: str, removed: list[int], query_ids: list[str]) -> dict:
        """`{"loss": {id: mean response NLL}, "pass": {id: bool}, "removed": [...]}` after retraining without
        `removed` (training positions), measured on `query_ids`."""
        path = self.dir / f"{label}.json"
        if path.exists():
            return json.loads(path.read_text())
        from llm_attr.evaluation.removal import evaluate_model, task_measure
        from llm_attr.evaluation.retrain import Retrainer

        if self._retrainer is None:
            self._retrainer = Retrainer(str(self.target), self.train, "base", None, None)
        t0 = time.time()
        keep = sorted(set(range(len(self.train))) - set(removed))
        self._retrainer.fit(keep, seed=self.seed, desc=label)
        records = [self.queries[q] for q in query_ids]
        measured = evaluate_model(self._retrainer, records, task_measure(self.task), MAX_NEW_TOKENS[self.task], 32)
        result = {"loss": dict(zip(query_ids, measured["loss"], strict=True)),
                  "pass": dict(zip(query_ids, measured["success"], strict=True)),
                  "removed": [self.train[i].id for i in removed], "seconds": round(time.time() - t0, 1)}
        path.write_text(json.dumps(result))
        logger.info("%s: %d removed, pass %d/%d, %.0f s", label, len(removed), sum(result["pass"].values()),
                    len(records), result["seconds"])
        return result


def bootstrap(values: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the mean of `values` (resampled over its entries)."""
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("math", "ifeval"), required=True)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-pool", type=int, default=64, help="held-out queries generated and checked")
    ap.add_argument("--templates", default="one-step", help="math: one-step | all | comma-separated kinds")
    ap.add_argument("--groups", type=int, default=2, help="query groups attributed and removed for")
    ap.add_argument("--per-group", type=int, default=8, help="queries per group (at most)")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 24], help="removal sizes")
    ap.add_argument("--random-draws", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--target-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--daunce-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stop-after", choices=("data", "target", "queries", "methods"))
    ap.add_argument("--json", type=Path, help="write the figures here (default WORK/results.json)")
    args = ap.parse_args()
    setup_logging(logging.INFO)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = build_data(args.task, work, args.n_train, args.n_pool, args.seed, args.templates)
    if args.stop_after == "data":
        return
    target = build_target(args.model, work, paths["train"], TARGET, args.target_set)
    if args.stop_after == "target":
        return
    if is_main():
        chosen = select_queries(args.task, target, paths, work, args.groups, args.per_group)
        logger.info("target passes %.0f%% of %d pool queries; groups %s", 100 * chosen["pass_rate"],
                    chosen["n_pool"], {g: len(v) for g, v in chosen["groups"].items()})
    if args.stop_after == "queries":
        return
    wait_for([work / "queries.json"])
    chosen = json.loads((work / "queries.json").read_text())
    query_file = work / "query.jsonl"
    runs = {m: run_method(m, target, paths["train"], query_file, work, args.daunce_set) for m in args.methods}
    if args.stop_after == "methods" or not is_main():
        return
    train = list(load_records(paths["train"]))
    queries = {r.id: r for r in load_records(query_file)}
    all_ids = [q for ids in chosen["groups"].values() for q in ids]
    removals = Removals(args.task, target, train, queries, work, args.seed)
    reference = removals.outcome("full", [], all_ids)
    results = {"task": args.task, "model": args.model, "n_train": len(train), "k": args.k,
               "pass_rate": chosen["pass_rate"], "groups": {g: len(v) for g, v in chosen["groups"].items()},
               "reference_pass": float(np.mean(list(reference["pass"].values()))), "methods": {},
               "target_seconds": json.loads((work / "target_wall.json").read_text())["seconds"]}
    for name in [*args.methods, "random"]:
        entries = []
        seconds = 0.0
        for k in args.k:
            per_group = []
            for g, ids in chosen["groups"].items():
                if name == "random":
                    rng = np.random.default_rng([args.seed, k, sorted(chosen["groups"]).index(g)])
                    draws = [removals.outcome(f"random-{g}-k{k}-d{d}",
                                              sorted(rng.choice(len(train), k, replace=False).tolist()), ids)
                             for d in range(args.random_draws)]
                else:
                    scores, seconds = method_scores(name, runs[name], ids, len(train), args.seed)
                    top = np.argsort(-scores.mean(0), kind="stable")[:k]
                    draws = [removals.outcome(f"{name}-{g}-k{k}", sorted(top.tolist()), ids)]
                per_group.append((ids, draws))
            # over every group's queries that pass under the reference, each measured after its own group's
            # removal; a query's flip and loss increase are averaged over the random draws
            flips, rises = [], []
            for ids, draws in per_group:
                base = [q for q in ids if reference["pass"][q]]
                flips += [np.mean([not d["pass"][q] for d in draws]) for q in base]
                rises += [np.mean([d["loss"][q] - reference["loss"][q] for d in draws]) for q in base]
            flips_a, rises_a = np.array(flips), np.array(rises)
            entries.append({"k": k, "flip_rate": float(flips_a.mean()) if len(flips) else float("nan"),
                            "flip_ci95": bootstrap(flips_a), "loss_increase": float(rises_a.mean()),
                            "loss_ci95": bootstrap(rises_a), "n_queries": len(flips)})
        results["methods"][name] = {"by_k": entries, "seconds": seconds}
        for e in entries:
            logger.info("%-10s k=%-3d flips %.2f [%.2f, %.2f]  loss +%.3f [%.3f, %.3f]  (%d queries)", name, e["k"],
                        e["flip_rate"], *e["flip_ci95"], e["loss_increase"], *e["loss_ci95"], e["n_queries"])
    out = args.json or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
