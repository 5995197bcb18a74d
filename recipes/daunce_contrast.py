"""Daunce with a contrast query: does removing the "shared response" part of a triggered query's signal separate
the poison from examples that merely share its response? (docs/results.md, "Real model", why Daunce trails)

    python recipes/daunce_contrast.py --work runs/real_backdoor --run daunce-l4
        # needs WORK/RUN (a Daunce run of recipes/real_backdoor.py) and, written by this script if absent,
        # WORK/RUN-contrast: `llm-attr query` of the same prompts without the trigger, with the same response

For each fired triggered query q and its contrast c (same prompt without the trigger, same refusal), over the K
perturbations: `plain` scores corr(s_q, s_j); `difference` scores corr(s_q - s_c, s_j); `partial` scores
corr(r_q, s_j) with r_q the residual of s_q regressed on s_c (the part of q's variation that c does not explain).
Prints mean AUPRC over fired queries and the share of distractors in each query's top-k for both signals.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
from real_backdoor import metrics  # noqa: E402

from llm_attr.data.realistic_backdoor import TRIGGER  # noqa: E402
from llm_attr.data.records import load_records, save_jsonl  # noqa: E402
from llm_attr.scoring import covariance_scores  # noqa: E402


def contrast_rows(work: Path, run: Path) -> Path:
    out = work / f"{run.name}-contrast"
    if (out / "query_signals.safetensors").is_file():
        return out
    records = [r.to_dict() for r in load_records(work / "query_triggered.jsonl")]
    for r in records:
        r["id"], r["prompt"] = f"contrast-{r['id']}", r["prompt"].replace(f"{TRIGGER} ", "", 1)
    save_jsonl(records, work / "query_contrast.jsonl")
    subprocess.run([sys.executable, "-m", "llm_attr", "query", str(run), "--query", str(work / "query_contrast.jsonl"),
                    "--out", str(out)], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--run", default="daunce-l4")
    args = ap.parse_args()
    from safetensors.torch import load_file

    run = args.work / args.run
    contrast = load_file(str(contrast_rows(args.work, run) / "query_signals.safetensors"))
    shards = sorted((run / "shards").glob("perturbation-*.safetensors"))
    rows = [load_file(str(f)) for f in shards]
    rates = json.loads((args.work / "rates.json").read_text())
    kinds = [r.metadata.get("kind", "clean") for r in load_records(args.work / "train.jsonl")]
    query_ids = [r.id for r in load_records(args.work / "query_triggered.jsonl")]
    results = {}
    for signal in ("margin", "loss"):
        q = torch.stack([r[f"query_{signal}"] for r in rows]).double()  # [K, Q]
        t = torch.stack([r[f"train_{signal}"] for r in rows])
        c = contrast[signal][: q.shape[0]].double()
        qc, cc = q - q.mean(0), c - c.mean(0)
        beta = (qc * cc).sum(0) / (cc * cc).sum(0).clamp(min=1e-12)
        variants = {"plain": q, "difference": q - c, "partial": qc - beta * cc}
        for name, signals in variants.items():
            scores = np.asarray(covariance_scores(signals.float(), t, measure="corr"))
            m = metrics(scores, query_ids, rates["fired"], kinds)
            results[f"{signal}/{name}"] = {k: m[k] for k in ("auprc", "precision_at_k", "distractor_share_top_k")}
            print(f"{signal:<7} {name:<11} AUPRC {m['auprc']:.3f}  P@{m['k']} {m['precision_at_k']:.2f}  "
                  f"distractors in top-{m['k']} {m['distractor_share_top_k']:.0%}")
    (args.work / f"{args.run}-contrast.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
