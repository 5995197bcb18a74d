"""Daunce on the built-in backdoor: AUPRC of poisoned vs clean training examples for triggered queries.

The study behind the defaults in configs/daunce.yaml (table in docs/results.md, "Daunce on the built-in backdoor"):

    python recipes/daunce_backdoor_sweep.py --work /tmp/daunce_sweep --ks 4 8 16 32 64 \
        --variant default --variant "black-box:first_order=false,subsample_ratio=0.5" --json sweep.json

1. Builds the demo's backdoor task (240 MATH-style records, 5% poisoned with "cf zeta" -> "ACCESS DENIED...",
   32 triggered queries) and fine-tunes the demo's target (configs/backdoor_target.yaml), checking that it follows
   the backdoor on >= 90% of triggered prompts (a target that has not learned it proves nothing).
2. For each variant (`name` or `name:key=value,key=value` overrides of configs/daunce.yaml), runs Daunce with the
   largest K into WORK/<name> (resumable: a re-run reuses finished perturbations).
3. Scores every K, cov/corr x loss/margin, and prints the mean AUPRC over queries (average precision of the
   poisoned examples; chance = the poison rate) and precision@12 (12 = #poisoned). A K below the largest is
   scored on each disjoint block of K perturbations and averaged (min-max in the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from llm_attr.config import load_config
from llm_attr.data.records import load_records, save_jsonl
from llm_attr.evaluation.metrics import retrieval_metrics
from llm_attr.methods.daunce import Daunce, DaunceConfig, shard_name
from llm_attr.scoring import covariance_scores
from llm_attr.store import Store
from llm_attr.utils import setup_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import parse_variant, theta0_train_loss  # noqa: E402

logger = logging.getLogger("daunce_backdoor_sweep")
ROOT = Path(__file__).resolve().parent.parent


def make_target(work: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """(target run dir, train.jsonl, triggered queries) of the demo's backdoor, built once under `work`."""
    from llm_attr.data.backdoor import make_backdoor_task
    from llm_attr.demo import backdoor_rates, target_config
    from llm_attr.finetune import finetune

    work.mkdir(parents=True, exist_ok=True)
    train_path, query_path = work / "train.jsonl", work / "query_triggered.jsonl"
    train, triggered, clean = make_backdoor_task(n_train=240, n_query=32, fraction=0.05, seed=seed)
    save_jsonl(train, train_path)
    save_jsonl(triggered, query_path)
    target = finetune("builtin:tiny", train_path, work / "target", target_config())
    rate, clean_rate = backdoor_rates(target, triggered, clean)
    logger.info("target follows the backdoor on %.0f%% of triggered, %.0f%% of clean prompts", 100 * rate,
                100 * clean_rate)
    if rate < 0.9:
        raise SystemExit(f"the target follows the backdoor on only {rate:.0%} of triggered prompts (< 90%)")
    return target, train_path, query_path


def evaluate(run: Path, ks: list[int], poisoned: list[bool]) -> list[dict]:
    """AUPRC / precision@#poisoned for every K x measure x signal from the run's shards.

    With K_max perturbations, a K < K_max is scored on each of the K_max // K disjoint blocks of K perturbations
    and the mean (min, max) reported: the expected AUPRC at K, not one draw (which varies a lot at small K).
    """
    store = Store.open(run, "daunce")
    k_max = max(ks)
    shards = [store.read_shard(shard_name(k)) for k in range(k_max)]
    rows = []
    drift = float(torch.stack([s["train_loss"] for s in shards]).mean())  # mean training loss under the θ_k
    for signal in ("loss", "margin"):
        train = torch.stack([s[f"train_{signal}"] for s in shards])
        query = torch.stack([s[f"query_{signal}"] for s in shards])
        for measure in ("cov", "corr"):
            for k in ks:
                blocks = []
                for start in range(0, k_max - k + 1, k):
                    scores = covariance_scores(query[start:start + k], train[start:start + k], measure=measure)
                    blocks.append(retrieval_metrics(scores, poisoned, k=sum(poisoned)))
                auprc = [b["auprc"] for b in blocks]
                rows.append({"signal": signal, "measure": measure, "K": k, "blocks": len(blocks), "perturbed_loss": drift,
                             "auprc": sum(auprc) / len(auprc), "auprc_min": min(auprc), "auprc_max": max(auprc),
                             "precision_at_poisoned": sum(b[f"precision@{sum(poisoned)}"] for b in blocks) / len(blocks),
                             "chance": blocks[0]["chance"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/daunce_sweep", help="target, data and one run directory per variant")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--variant", action="append", default=[], help="name[:key=value,...] (repeatable)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "daunce.yaml"))
    ap.add_argument("--seed", type=int, default=0, help="backdoor data / target seed")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args()
    os.environ.setdefault("LLM_ATTR_PROGRESS", "0")
    setup_logging(logging.INFO)
    work = Path(args.work)
    target, train_path, query_path = make_target(work / f"data-seed{args.seed}", args.seed)
    poisoned = [bool(r.metadata.get("poisoned")) for r in load_records(train_path)]
    base_loss = theta0_train_loss(target, train_path, 512)  # the drift column's reference
    all_rows = []
    for text in args.variant or ["default"]:
        name, overrides = parse_variant(text)
        overrides["perturbations"] = max(args.ks)
        cfg = load_config(DaunceConfig, args.config, overrides)
        t0 = time.time()
        run = Daunce(cfg).run(str(target), train_path, query_path, work / f"seed{args.seed}-{name}", score=False)
        seconds = time.time() - t0
        for row in evaluate(run, args.ks, poisoned):
            all_rows.append({"variant": name, "overrides": text.partition(":")[2], "theta0_loss": base_loss, **row})
        logger.info("%s: %.0fs", name, seconds)
    print(f"mean training loss under the target θ₀: {base_loss:.3f}; 'θ_k/θ₀': the same under the perturbed models")
    print(f"{'variant':<20} {'θ_k/θ₀':>7} {'signal':<7} {'measure':<5} " + " ".join(f"K={k:<5}" for k in args.ks))
    for key in dict.fromkeys((r["variant"], r["signal"], r["measure"]) for r in all_rows):
        sel = [r for r in all_rows if (r["variant"], r["signal"], r["measure"]) == key]
        vals = {r["K"]: r["auprc"] for r in sel}
        print(f"{key[0]:<20} {sel[0]['perturbed_loss'] / base_loss:>7.2f} {key[1]:<7} {key[2]:<5} "
              + " ".join(f"{vals[k]:<7.3f}" for k in args.ks))
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1))


if __name__ == "__main__":
    main()
