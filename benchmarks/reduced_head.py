"""The reduced lm_head (`llm_attr/reduced_head.py`) against the full vocabulary: the speed of one loss-matrix row
and of one Newton gradient pass, and how far its rows are from the exact ones, on a real target.

    python benchmarks/reduced_head.py --target runs/bd6/target --train runs/bd6/train.jsonl \
        [--n 128] [--top-k 16 64 256] [--json benchmarks/results/reduced_head.json]

The target's own LoRA on its last 4 decoder layers is the perturbed part (`adapter: continue`, `lora.layers: 4`,
frozen-prefix cache below), as in a Daunce run. The perturbation is a random direction in those LoRA weights,
scaled so that the mean training loss rises 5% (the newton solver's default step length). Reported per top_k:
- `row_seconds` (exact, reduced; medians of 3, interleaved) and `gradient_seconds` (one backward pass over the
  examples, as a Newton step's);
- the rows' agreement: Pearson correlation of the per-example loss and margin changes Δℓ = ℓ(θ₀+δ) − ℓ(θ₀) between
  the two heads, and the mean |error| over the mean |Δℓ|; the mean tail probability at θ₀.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from llm_attr.data.records import load_records
    from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
    from llm_attr.losses import autocast, evaluate_signal, per_example_loss, response_window, window_logits
    from llm_attr.models.lora import LoraArgs
    from llm_attr.models.prefix_cache import prefix_cache
    from llm_attr.reduced_head import reduced_head
    from llm_attr.runner import PerturbationModel, load_target

    torch.manual_seed(0)
    net, tok = load_target(a.target, "continue", "cpu")
    pm = PerturbationModel(net, "continue", LoraArgs(layers=4))
    examples, _ = tokenize_records(list(load_records(a.train))[: a.n], tok, 128)
    pad = pad_id_of(tok)
    sig = ("loss", "margin")

    def rows(head=None):
        t0 = time.perf_counter()
        out = evaluate_signal(pm.model, examples, pad, batch_size=64, signal=sig, precision=a.precision, head=head)
        return out, time.perf_counter() - t0

    def gradient_pass(head=None) -> float:
        t0 = time.perf_counter()
        for s in range(0, len(examples), 16):
            batch = collate(examples[s : s + 16], pad)
            keep = response_window(batch["labels"])
            with autocast(a.precision, "cpu"):
                logits, labels = window_logits(pm.model, batch, keep, head)
            per_example_loss(logits.float(), labels).sum().backward()
        pm.model.zero_grad()
        return time.perf_counter() - t0

    report = {"target": a.target, "n": len(examples), "precision": a.precision, "by_top_k": {}}
    with prefix_cache(pm.model, examples, pad, batch_size=64):
        base, _ = rows()
        start = {n: q.detach().clone() for n, q in pm.trainable.items()}
        direction = {n: torch.randn_like(q) * q.detach().abs().mean() for n, q in pm.trainable.items()}

        def set_scale(c: float) -> None:
            with torch.no_grad():
                for n, q in pm.trainable.items():
                    q.copy_(start[n] + c * direction[n])

        lo, hi = 0.0, 1.0  # bisection for a 5% rise of the mean training loss
        for _ in range(30):
            set_scale(hi)
            if float(rows()[0]["loss"].mean() / base["loss"].mean()) > 1.05:
                break
            lo, hi = hi, hi * 2
        for _ in range(12):
            mid = (lo + hi) / 2
            set_scale(mid)
            lo, hi = (mid, hi) if float(rows()[0]["loss"].mean() / base["loss"].mean()) < 1.05 else (lo, mid)
        set_scale(hi)
        exact, _ = rows()
        report["loss_ratio"] = float(exact["loss"].mean() / base["loss"].mean())
        for k in a.top_k:
            set_scale(0.0)
            t0 = time.perf_counter()
            head = reduced_head(pm.model, examples, pad, top_k=k, batch_size=64, precision=a.precision)
            build = time.perf_counter() - t0
            set_scale(hi)
            times = {"exact": [], "reduced": []}
            for _ in range(3):
                reduced, t = rows(head)
                times["reduced"].append(t)
                times["exact"].append(rows()[1])
            grad = {"exact": gradient_pass(), "reduced": gradient_pass(head)}
            entry = {"build_seconds": round(build, 2), "mean_tail_mass": head.mean_tail_mass,
                     "row_seconds": {s: round(statistics.median(v), 2) for s, v in times.items()},
                     "gradient_seconds": {s: round(v, 2) for s, v in grad.items()}}
            for s in sig:
                d_exact, d_red = exact[s] - base[s], reduced[s] - base[s]
                entry[f"{s}_change_corr"] = float(torch.corrcoef(torch.stack([d_exact, d_red]))[0, 1])
                entry[f"{s}_rel_error"] = float((d_red - d_exact).abs().mean() / d_exact.abs().mean())
            report["by_top_k"][k] = entry
            print(k, json.dumps(entry), flush=True)
            if a.json:  # after each top_k: a killed run keeps what it measured
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
