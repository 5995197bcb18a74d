"""Alternative scorings of a stored Daunce run of `recipes/real_backdoor.py` (docs/results.md, the Daunce levers): no training.

    python recipes/daunce_rescorings.py --work runs/tiny_bd --run daunce32

For margin and loss rows, mean AUPRC of the poisoned examples over the fired queries of:
- `modes R`: corr / cov after projecting the top R common modes of the centred train rows (over k) out of both
  the query and the train rows (the shared-response direction, if it is a mode of its own);
- `minus mean shift`: corr / cov after projecting out the per-k mean shift of all train signals;
  printed with it: the top mode's share of the rows' variance and its |cos| with that shift;
- `out` / `in`: corr / cov over only the perturbations whose subset D_k leaves example j out (or takes it in);
- `in-minus-out`: the datamodel contrast, mean query signal change with j in D_k minus with j out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import perturbation_rows  # noqa: E402
from real_backdoor import metrics  # noqa: E402

from llm_attr.data.records import load_records  # noqa: E402
from llm_attr.scoring import covariance_scores  # noqa: E402


def masked_scores(q: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, measure: str) -> np.ndarray:
    """scores `[Q, N]`: cov / corr of q `[K, Q]` and t `[K, N]` over the k where `mask` `[K, N]` is true."""
    w = mask.double()
    n = w.sum(0).clamp(min=2)
    tc = (t - (t * w).sum(0) / n) * w
    out = []
    for i in range(q.shape[1]):
        qi = q[:, i:i + 1]
        qc = (qi - (qi * w).sum(0) / n) * w
        s = (qc * tc).sum(0) / (n - 1)
        if measure == "corr":
            s = s / ((qc ** 2).sum(0).sqrt() * (tc ** 2).sum(0).sqrt() / (n - 1) + 1e-30)
        out.append(s)
    return torch.stack(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a recipes/real_backdoor.py work directory")
    ap.add_argument("--run", required=True, help="the Daunce run's name in it (e.g. daunce)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    rates = json.loads((args.work / "rates.json").read_text())
    kinds = [r.metadata.get("kind", "clean") for r in load_records(args.work / "train.jsonl")]
    qids = [r.id for r in load_records(args.work / "query_triggered.jsonl")]
    rows = perturbation_rows(args.work / args.run)
    k = len(rows)
    inset = torch.zeros(k, len(kinds), dtype=torch.bool)
    for i, r in enumerate(rows):
        inset[i, r["subset"].long()] = True
    out: dict[str, float] = {}

    def record(name: str, scores: np.ndarray) -> None:
        out[name] = round(metrics(scores, qids, rates["fired"], kinds)["auprc"], 4)
        print(f"{name:32s} AUPRC {out[name]:.3f}")

    for signal in ("margin", "loss"):
        q = torch.stack([r[f"query_{signal}"] for r in rows]).double()
        t = torch.stack([r[f"train_{signal}"] for r in rows]).double()
        qc, tc = q - q.mean(0), t - t.mean(0)
        u, sv, _ = torch.linalg.svd(tc, full_matrices=False)  # u [K, K]: the train rows' modes over k
        shift = tc.mean(1, keepdim=True)  # [K, 1]: every train example's signal moving together
        out[f"{signal}/top mode variance share"] = round(float(sv[0] ** 2 / (sv ** 2).sum()), 4)
        out[f"{signal}/top mode |cos| with the mean shift"] = round(float((u[:, 0] @ shift[:, 0]).abs() / shift.norm()), 4)
        print(f"{signal}: top mode {out[f'{signal}/top mode variance share']:.0%} of the variance, |cos| with the "
              f"mean shift {out[f'{signal}/top mode |cos| with the mean shift']:.3f}")
        p = torch.eye(k, dtype=torch.float64) - (shift @ shift.T) / (shift.T @ shift)
        for measure in ("corr", "cov"):
            record(f"{signal}/{measure}/minus mean shift",
                   np.asarray(covariance_scores((p @ qc).float(), (p @ tc).float(), measure=measure)))
        for n_modes in (0, 1, 2, 3):
            p = torch.eye(k, dtype=torch.float64) - u[:, :n_modes] @ u[:, :n_modes].T
            for measure in ("corr", "cov"):
                record(f"{signal}/{measure}/modes {n_modes}",
                       np.asarray(covariance_scores((p @ qc).float(), (p @ tc).float(), measure=measure)))
        for label, mask in (("out", ~inset), ("in", inset)):
            for measure in ("corr", "cov"):
                record(f"{signal}/{measure}/{label}", masked_scores(q, t, mask, measure))
        diff = np.stack([((qc[:, i:i + 1] * inset).sum(0) / inset.sum(0).clamp(min=1)
                          - (qc[:, i:i + 1] * ~inset).sum(0) / (~inset).sum(0).clamp(min=1)).numpy()
                         for i in range(q.shape[1])])
        record(f"{signal}/in-minus-out", -diff if signal == "loss" else diff)
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.work / args.run), "K": k, "auprc": out}, indent=1))


if __name__ == "__main__":
    main()
