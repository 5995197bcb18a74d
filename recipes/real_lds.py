"""Study (d) and the Daunce budget frontier (e) on a real model (default SmolLM2-135M-Instruct): LDS against
retraining on random halves, for Daunce at K = 8..64 (and budget variants) and every gradient method.

    python recipes/real_lds.py --work runs/real_lds                                   # every stage, resumable
    python recipes/real_lds.py --work runs/real_lds --variant "k64:perturbations=64" --plot lds.png
    accelerate launch --multi_gpu --num_processes 2 recipes/real_lds.py --work W      # retrains and Daunce on 2

1. data: `--n-train` one-step MATH records (`\\boxed{}` answers) and `--n-query` held-out queries.
2. target: the removal study's target config (rank-16 LoRA on the last 12 layers, `--target-set` overrides).
3. ground truth: `llm-attr retrain` on `--subsets` random halves from the base (the target's own config), every
   query's loss recorded (a resumable store, split over processes).
4. methods: one gradient run (exact LoRA gradients with K-FAC statistics) scored as grad-dot, grad-cos, if-fisher,
   if-kfac and if-ekfac (if-fisher where its dense matrix fits); Daunce with configs/daunce.yaml and each
   `--variant NAME:key=value,...` (default: `VARIANTS`, block rows per layer at K=16 and quarter-epoch
   perturbations on random quarters at K=32).
5. LDS (mean over queries of the Spearman correlation over retrains, 95% bootstrap interval over queries) of each
   method; Daunce at every K = 8, 16, ... up to its run's K, for loss/margin x cov/corr, with the wall time of its
   first K perturbations. Written to `--json`, and LDS against wall time plotted to `--plot`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import ROOT, build_target, is_main, wait_for  # noqa: E402

from llm_attr.config import load_config, parse_overrides  # noqa: E402
from llm_attr.data.records import save_jsonl  # noqa: E402
from llm_attr.utils import setup_logging  # noqa: E402

logger = logging.getLogger("real_lds")

TARGET = {"epochs": 3.0, "learning_rate": 1e-3, "batch_size": 16, "max_length": 128, "group_by_length": True,
          "lora": {"rank": 16, "alpha": 32.0, "layers": 12}, "save_steps": 0}
#: Daunce runs of docs/results.md: the former default (every perturbation on all the data) with block rows per
#: layer at K=16, and the budget frontier's other end, K=32 perturbations of a quarter epoch on random quarters
#: (the same training steps as K=8 of one epoch)
VARIANTS = ("layers:keep_adapters=false,max_length=128,group_by_length=true,row_blocks=layer,perturbations=16,"
            "subsample_ratio=1.0",
            "quarter:keep_adapters=false,max_length=128,group_by_length=true,subsample_ratio=0.25,perturbations=32")
GRADIENT_SCORINGS = ("grad-dot", "grad-cos", "if-fisher", "if-kfac", "if-ekfac")


def build_data(work: Path, n_train: int, n_query: int, seed: int) -> dict[str, Path]:
    from llm_attr.data.math_task import ONE_STEP, make_math

    paths = {"train": work / "train.jsonl", "query": work / "query.jsonl"}
    if is_main() and not all(p.is_file() for p in paths.values()):
        records = make_math(n_train + n_query, seed=seed, templates=ONE_STEP)
        save_jsonl(records[:n_train], paths["train"])
        save_jsonl(records[n_train:], paths["query"])
    wait_for(list(paths.values()))
    return paths


def ground_truth(target: Path, paths: dict[str, Path], work: Path, subsets: int) -> Path:
    from llm_attr.evaluation.retrain import RetrainConfig, retrain

    out = work / "ground_truth"
    wall = work / "ground_truth_wall.json"
    if not wall.exists():
        t0 = time.time()
        retrain(str(target), paths["train"], paths["query"], out, RetrainConfig(subsets=subsets, start="base"))
        if is_main():
            wall.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    wait_for([wall])
    return out


def gradients(target: Path, paths: dict[str, Path], work: Path) -> tuple[Path, float]:
    from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig

    out = work / "gradients"
    wall = out / "wall.json"
    if not wall.exists():
        t0 = time.time()
        GradientAttribution(GradientConfig(method="if-ekfac", max_length=128)).run(
            str(target), paths["train"], paths["query"], out)
        if is_main():
            wall.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    wait_for([wall])
    return out, json.loads(wall.read_text())["seconds"]


def daunce(name: str, sets: str, target: Path, paths: dict[str, Path], work: Path) -> tuple[Path, float]:
    from llm_attr.methods.daunce import Daunce, DaunceConfig

    out = work / f"daunce-{name}"
    wall = out / "wall.json"
    if not wall.exists():
        overrides = parse_overrides([s for s in sets.split(",") if s]) if sets else {}
        cfg = load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml", {"perturbations": 64, **overrides})
        t0 = time.time()
        Daunce(cfg).run(str(target), paths["train"], paths["query"], out, score=False)
        if is_main():
            wall.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    wait_for([wall])
    return out, json.loads(wall.read_text())["seconds"]


def daunce_rows(run: Path) -> tuple[dict[str, np.ndarray], list[float]]:
    """`{side_signal: [K, n]}` from the run's shards (perturbation order) and each perturbation's seconds."""
    from llm_attr.methods.daunce_store import shard_name
    from llm_attr.store import Store

    store = Store.open(run, "daunce")
    done = set(store.complete_shards())
    names = [shard_name(k) for k in range(store.manifest["perturbations"]) if shard_name(k) in done]
    shards = [store.read_shard(n) for n in names]
    metas = [(store.shard_info(n) or {}).get("meta", {}) for n in names]
    # a process's once-only setup (prefix cache, θ₀'s outputs, K-FAC factors) is charged to its first shard
    seconds = [float(m.get("seconds", 0.0)) + float(m.get("setup_seconds", 0.0)) for m in metas]
    rows = {key: np.stack([s[key].numpy() for s in shards]) for key in shards[0]
            if key.startswith(("train_", "query_")) and key.endswith(("_loss", "_margin", "_blocks"))}
    return rows, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-query", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=16, help="M retrains on random halves")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=[], help="Daunce NAME[:key=value,...] (repeatable; "
                    "configs/daunce.yaml at K=64 plus these overrides); default: the two of docs/results.md")
    ap.add_argument("--target-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, help="write the figures here (default WORK/results.json)")
    ap.add_argument("--plot", type=Path, help="LDS against wall time (PNG)")
    args = ap.parse_args()
    setup_logging(logging.INFO)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = build_data(work, args.n_train, args.n_query, args.seed)
    target = build_target(args.model, work, paths["train"], TARGET, args.target_set)
    truth = ground_truth(target, paths, work, args.subsets)
    grad_run, grad_seconds = gradients(target, paths, work)
    variants = [v.partition(":") for v in (args.variant or list(VARIANTS))]
    runs = {name: daunce(name, sets, target, paths, work) for name, _, sets in variants}
    if not is_main():
        return
    import torch

    from llm_attr.errors import LlmAttrError
    from llm_attr.evaluation.compare import load_scores
    from llm_attr.evaluation.metrics import lds
    from llm_attr.evaluation.retrain import load_ground_truth
    from llm_attr.methods.daunce_blocks import stacked_block_rows
    from llm_attr.methods.gradient_store import score_run
    from llm_attr.scoring import covariance_scores

    gt = load_ground_truth(truth)
    rows = []
    for method in GRADIENT_SCORINGS:
        try:
            score_run(grad_run, method=method)
        except LlmAttrError as e:  # e.g. if-fisher's dense matrix over exact LoRA gradients: too large
            logger.info("%s: not scored (%s)", method, e)
            continue
        values = load_scores(grad_run).aligned(gt["query_ids"], gt["train_ids"])
        r = lds(values, gt["masks"], gt["outcomes"])
        rows.append({"method": method, "K": None, "lds": r["lds"], "ci95": r["ci95"], "seconds": grad_seconds})
    for name, (run, seconds) in runs.items():
        signals, per_shard = daunce_rows(run)
        k_max = signals["query_loss"].shape[0]
        overhead = max(0.0, seconds - sum(per_shard))  # θ₀'s outputs, prefix cache, loading
        kinds = ("full", "blocks") if "train_loss_blocks" in signals else ("full",)
        for signal, measure, kind in itertools.product(("loss", "margin"), ("cov", "corr"), kinds):
            for k in [k for k in (4, 8, 16, 32, 64, 128) if k <= k_max]:
                if kind == "blocks":  # each block centred over k, stacked (methods/daunce_blocks.py)
                    q, t = (stacked_block_rows(list(torch.from_numpy(signals[f"{side}_{signal}_blocks"][:k])))
                            for side in ("query", "train"))
                else:
                    q, t = (torch.from_numpy(signals[f"{side}_{signal}"][:k]) for side in ("query", "train"))
                values = np.asarray(covariance_scores(q, t, measure=measure), dtype=np.float64)
                r = lds(values, gt["masks"], gt["outcomes"])
                rows.append({"method": f"daunce-{name}", "signal": signal, "measure": measure, "rows": kind,
                             "K": k, "lds": r["lds"], "ci95": r["ci95"], "seconds": overhead + sum(per_shard[:k])})
    rng = np.random.default_rng(args.seed)
    r = lds(rng.standard_normal((len(gt["query_ids"]), len(gt["train_ids"]))), gt["masks"], gt["outcomes"])
    rows.append({"method": "random", "K": None, "lds": r["lds"], "ci95": r["ci95"], "seconds": 0.0})
    results = {"model": args.model, "n_train": len(gt["train_ids"]), "n_query": len(gt["query_ids"]),
               "subsets": int(gt["masks"].shape[0]),
               "target_seconds": json.loads((work / "target_wall.json").read_text())["seconds"],
               "ground_truth_seconds": json.loads((work / "ground_truth_wall.json").read_text())["seconds"],
               "variants": {name: sets for name, _, sets in variants}, "rows": rows}
    for row in rows:
        label = row["method"] + (f" {row['signal']}/{row['measure']} {row['rows']} K={row['K']}"
                                 if row.get("K") else "")
        logger.info("%-44s LDS %+.3f [%+.3f, %+.3f]  %.0f s", label, row["lds"], *row["ci95"], row["seconds"])
    out = args.json or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in results["rows"]:
        if row.get("K") is None and row["method"] != "random":
            ax.errorbar(row["seconds"], row["lds"], yerr=[[row["lds"] - row["ci95"][0]], [row["ci95"][1] - row["lds"]]],
                        fmt="s", capsize=3, label=row["method"])
    series: dict[str, list] = {}
    for row in results["rows"]:
        if row.get("K"):
            series.setdefault(f"{row['method']} {row['signal']}/{row['measure']} {row['rows']}", []).append(row)
    for label, pts in series.items():
        if not any(f" {sm} " in label for sm in ("loss/cov", "margin/corr")):
            continue  # the two scorings of docs/results.md
        ax.plot([p["seconds"] for p in pts], [p["lds"] for p in pts], "o-", ms=3, label=label)
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("wall time (s, log)")
    ax.set_ylabel("LDS")
    ax.set_title(f"LDS on {results['model']}, N={results['n_train']}, M={results['subsets']}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
