"""Daunce's LDS as K grows, for every signal and measure, on the benchmark's LDS study (docs/results.md, "Daunce
against retrained ground truth").

    python recipes/daunce_lds_sweep.py --work /tmp/daunce_lds --ks 8 16 32 64 128 256 \
        --variant default --variant "ep5:epochs=5" --variant "continue:adapter=continue" --json lds.json

1. Builds (once, under WORK/lds) the ground truth of `benchmarks/run.py --sections accuracy`, which is that of
   `recipes/lds.sh`: 64 MATH-style records, 16 queries, builtin:tiny fine-tuned with configs/tiny/finetune.yaml,
   16 random halves retrained from the base.
2. For each variant (`name` or `name:key=value,...` overrides of configs/daunce.yaml) runs Daunce with the largest
   K into WORK/<name> (resumable).
3. Scores the first K perturbations for every K, cov/corr x loss/margin, and prints the LDS (mean over queries of
   the Spearman correlation between the summed scores of each retrain's kept examples and the query's negative
   loss; the same `llm_attr.evaluation.metrics.lds` as `llm-attr eval lds`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "recipes"))

from _study import parse_variant  # noqa: E402

from llm_attr.config import load_config  # noqa: E402
from llm_attr.evaluation.compare import load_scores  # noqa: E402
from llm_attr.evaluation.metrics import lds  # noqa: E402
from llm_attr.evaluation.retrain import load_ground_truth  # noqa: E402
from llm_attr.methods.daunce import Daunce, DaunceConfig, score_run  # noqa: E402
from llm_attr.utils import setup_logging  # noqa: E402

logger = logging.getLogger("daunce_lds_sweep")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/daunce_lds", help="ground truth and one run directory per variant")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--variant", action="append", default=[], help="name[:key=value,...] (repeatable)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "daunce.yaml"))
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args()
    os.environ.setdefault("LLM_ATTR_PROGRESS", "0")
    setup_logging(logging.INFO)
    from run import lds_setup  # benchmarks/run.py: the accuracy section's ground truth, built once

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = lds_setup(work)
    gt = load_ground_truth(paths["ground_truth"])
    rows = []
    for text in args.variant or ["default"]:
        name, overrides = parse_variant(text)
        sets = text.partition(":")[2]
        overrides.update(perturbations=max(args.ks), keep_adapters=False, max_length=384)
        cfg = load_config(DaunceConfig, args.config, overrides)
        out = work / f"variant-{name}"
        t0 = time.time()
        Daunce(cfg).run(str(paths["target"]), paths["train"], paths["query"], out, score=False)
        seconds = time.time() - t0
        for signal in ("loss", "margin"):
            for measure in ("cov", "corr"):
                for k in args.ks:
                    score_run(out, measure=measure, signal=signal, perturbations=k)
                    values = load_scores(out).aligned(gt["query_ids"], gt["train_ids"])
                    result = lds(values, gt["masks"], gt["outcomes"])
                    rows.append({"variant": name, "overrides": sets, "signal": signal, "measure": measure, "K": k,
                                 "lds": result["lds"], "ci95": result["ci95"], "run_seconds": seconds})
        logger.info("%s: %.0f s for K=%d", name, seconds, max(args.ks))
    print(f"{'variant':<16} {'signal':<7} {'measure':<7} " + " ".join(f"K={k:<6}" for k in args.ks))
    for key in dict.fromkeys((r["variant"], r["signal"], r["measure"]) for r in rows):
        values = {r["K"]: r["lds"] for r in rows if (r["variant"], r["signal"], r["measure"]) == key}
        print(f"{key[0]:<16} {key[1]:<7} {key[2]:<7} " + " ".join(f"{values[k]:<+8.3f}" for k in args.ks))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
