"""Where a damping rule puts λ in each LoRA weight's K-FAC spectrum (docs/results.md, Daunce levers 11).

    python recipes/daunce_spectrum.py --work runs/bd6 --run daunce-q05-s0          # a study of real_backdoor.py
    python recipes/daunce_spectrum.py --work runs/real_lds --run daunce-q05 --json spectrum.json   # of real_lds.py

`solver: newton` damps each LoRA weight's Kronecker eigenvalues e by λ. The `mean` rule sets λ to a fraction of their
mean, the `quantile` rule to one of their quantiles. This prints, for each rule value, the share of eigen-directions
above λ (the ones the step trusts) and the effective dimension Σ e / (e + λ) over the count, per weight and over all
of them. WORK is a study directory (`recipes/real_backdoor.py`, `real_lds.py`): its `target` and `train.jsonl`, and
θ₀'s K-FAC factor sums from WORK/RUN/newton_factors (a Daunce run with `solver: newton` there; computed if absent).
The adapter and its layers are taken as `configs/daunce.yaml` takes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import ROOT  # noqa: E402

from llm_attr.config import load_config  # noqa: E402
from llm_attr.data.records import load_records  # noqa: E402
from llm_attr.data.tokenize import pad_id_of, tokenize_records  # noqa: E402
from llm_attr.methods.daunce import DaunceConfig, PerturbationModel, load_target, resolved_adapter  # noqa: E402
from llm_attr.methods.daunce_newton import NewtonSolver, damping_of, stored_factor_sums  # noqa: E402

MEAN_FRACTIONS = (0.1, 0.01, 0.001, 1e-4)
QUANTILES = (0.4, 0.5, 0.6)


def shares(eig: torch.Tensor, lam: float) -> tuple[float, float]:
    """(share of eigenvalues above λ, effective dimension Σ e/(e + λ) / count) of one weight's spectrum."""
    e = eig.flatten().clamp_min(0)
    return float((e > lam).double().mean()), float((e / (e + lam)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path, help="the study directory (WORK/target, WORK/train.jsonl)")
    ap.add_argument("--run", required=True, help="a Daunce run under WORK (WORK/RUN/newton_factors)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    target, train, run = str(args.work / "target"), args.work / "train.jsonl", args.work / args.run
    cfg = load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml")
    device = torch.device("cpu")
    net, tok = load_target(target, resolved_adapter(cfg.adapter, target), device, "float32")
    pm = PerturbationModel(net, resolved_adapter(cfg.adapter, target), cfg.lora)
    examples, _ = tokenize_records(list(load_records(train)), tok, args.max_length, source=str(train))
    sums = stored_factor_sums(pm, examples, pad_id_of(tok), run / "newton_factors", process_index=0,
                              num_processes=1, batch_size=cfg.batch_size, precision="fp32")
    solver = NewtonSolver(pm, examples, pad_id_of(tok), batch_size=cfg.batch_size, precision="fp32", damping=0.1,
                          gamma=1.0, sums=sums)
    rules = [("mean", c) for c in MEAN_FRACTIONS] + [("quantile", q) for q in QUANTILES]
    weights, totals = [], {f"{r} {v:g}": [0.0, 0.0, 0] for r, v in rules}
    parts = solver._parts()  # each LoRA weight's Kronecker eigenvalues at θ₀
    for part in parts:
        row = {"shape": list(part.eig.shape)}
        for rule, value in rules:
            above, d_eff = shares(part.eig, damping_of(part.eig, value, rule))
            row[f"{rule} {value:g}"] = {"above": round(above, 4), "d_eff": round(d_eff, 4)}
            n = part.eig.numel()
            t = totals[f"{rule} {value:g}"]
            t[0], t[1], t[2] = t[0] + above * n, t[1] + d_eff * n, t[2] + n
        weights.append(row)
    summary = {key: {"above": round(a / n, 4), "d_eff": round(d / n, 4)} for key, (a, d, n) in totals.items()}
    print(f"{len(weights)} LoRA weights, {sum(p.eig.numel() for p in parts)} eigenvalues")
    print(f"{'rule':<16} {'share above λ':>14} {'d_eff / n':>10}   (per weight: min - max share above)")
    for key, s in summary.items():
        per = [w[key]["above"] for w in weights]
        print(f"{key:<16} {s['above']:>14.3f} {s['d_eff']:>10.3f}   ({min(per):.3f} - {max(per):.3f})")
    if args.json:
        args.json.write_text(json.dumps({"work": str(args.work), "run": args.run, "summary": summary, "weights": weights}, indent=1))


if __name__ == "__main__":
    main()
