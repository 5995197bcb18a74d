"""Which decoder layers carry the backdoor: grad-dot and grad-cos over layer ranges of a stored gradient run of
`recipes/real_backdoor.py` (docs/results.md, the Daunce levers): no model, no training.

    python recipes/gradient_layers.py --work runs/bd6 [--run grad-cos] [--json docs/gradient_layers.json]

The run's projected LoRA gradients ([N, d] and [Q, d], d the sum of every LoRA module's rank² block; the block
layout is in the store's manifest) are restricted to the modules of decoder layers [lo, hi), and the mean AUPRC of
the poisoned examples over the fired queries is reported for their inner product (grad-dot) and cosine (grad-cos).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_backdoor import metrics  # noqa: E402

from llm_attr.data.records import load_records  # noqa: E402
from llm_attr.store import Store  # noqa: E402

RANGES = ((0, 30), (0, 4), (0, 8), (0, 12), (0, 18), (8, 16), (16, 24), (24, 30), (26, 30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--run", default="grad-cos")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    work = Path(a.work)
    store = Store.open(work / a.run, "gradients")
    m = store.manifest
    layout, ids = m["layers"], m["ids"]
    train = torch.cat([store.read_shard(n)["gradients"] for n in sorted(m["shards"]) if n.startswith("train-c0-")]).float()
    query = torch.cat([store.read_shard(n)["gradients"] for n in sorted(m["shards"]) if n.startswith("query-c0-")]).float()
    kind = {r.id: r.metadata.get("kind") for r in load_records(work / "train.jsonl")}
    kinds = [kind[i] for i in ids["train"]]
    fired = json.loads((work / "rates.json").read_text())["fired"]
    layer_of = {b["name"]: int(re.search(r"layers\.(\d+)\.", b["name"]).group(1)) for b in layout}
    n_layers = 1 + max(layer_of.values())
    out = {"run": str(work / a.run), "n_layers": n_layers, "ranges": []}
    print(f"{'layers':>8}  grad-dot  grad-cos")
    for lo, hi in RANGES:
        hi = min(hi, n_layers)
        cols = torch.cat([torch.arange(b["start"], b["stop"]) for b in layout if lo <= layer_of[b["name"]] < hi])
        g, q = train[:, cols], query[:, cols]
        dot = (q @ g.T).numpy()
        cos = (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T).numpy()
        row = {"layers": [lo, hi], "grad_dot": metrics(dot, ids["query"], fired, kinds)["auprc"],
               "grad_cos": metrics(cos, ids["query"], fired, kinds)["auprc"]}
        out["ranges"].append(row)
        print(f"{lo:>3}-{hi - 1:<4}  {row['grad_dot']:.3f}     {row['grad_cos']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
