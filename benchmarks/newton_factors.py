"""The cost of Daunce's K-FAC factor pass (`solver: newton`) under fp32 and bf16 autocast, on a real target.

    python benchmarks/newton_factors.py --target runs/bd6/target --train runs/bd6/train.jsonl --n 64 \
        --repeats 2 --json benchmarks/results/newton_factors_2026-12-03.json

θ₀'s factors of every adapted layer of the target's own adapter (`adapter: continue`, `lora.layers: null`), over
the first `--n` training records, by `daunce_newton.factor_sums`: wall time of the pass per precision (the pairs
interleaved, so that both see the same load), and the relative Frobenius difference of the bf16 factors from the
fp32 ones (median and maximum over the factors). bf16 autocast takes the forward and the backward in bf16 (the
factor products stay float32); on a CPU without native bf16 it is emulated and slow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="a LoRA run directory or adapter folder")
    ap.add_argument("--train", required=True, help="training records (jsonl)")
    ap.add_argument("--n", type=int, default=64, help="records in the factor pass")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from llm_attr.data.records import load_records
    from llm_attr.data.tokenize import pad_id_of, tokenize_records
    from llm_attr.losses import native_bf16
    from llm_attr.methods.daunce_newton import factor_sums
    from llm_attr.models.lora import LoraArgs
    from llm_attr.runner import PerturbationModel, load_target

    net, tok = load_target(args.target, "continue", "cpu")
    pm = PerturbationModel(net, "continue", LoraArgs(layers=None))
    examples, _ = tokenize_records(list(load_records(args.train))[: args.n], tok, args.max_length)
    positions = list(range(len(examples)))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    sums = {}
    for _ in range(args.repeats):
        for precision in times:
            t0 = time.perf_counter()
            sums[precision] = factor_sums(pm, examples, positions, pad_id_of(tok), batch_size=args.batch_size,
                                          precision=precision)
            times[precision].append(time.perf_counter() - t0)
    diffs = [float((sums["bf16"][k] - sums["fp32"][k]).norm() / sums["fp32"][k].norm())
             for k in sums["fp32"] if k.startswith(("x.", "d."))]
    result = {
        "target": args.target, "records": len(examples), "threads": torch.get_num_threads(),
        "native_bf16": native_bf16(torch.device("cpu")),
        "trainable_parameters": sum(p.numel() for p in pm.trainable.values()),
        "seconds": {p: round(statistics.median(t), 2) for p, t in times.items()},
        "speedup_bf16": round(statistics.median(times["fp32"]) / statistics.median(times["bf16"]), 2),
        "relative_difference": {"median": round(statistics.median(diffs), 5), "max": round(max(diffs), 5)},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
