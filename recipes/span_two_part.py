"""Span against whole-response attribution on the two-part task of tests/test_spans.py (builtin:tiny, ~30 s):
the table of docs/results.md, "Span and per-token measurement".

    python recipes/span_two_part.py --work /tmp/span_two_part
"""
# ruff: noqa: E402, E702, I001  (a measuring script: tests/ on the path first)
import sys

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
from safetensors.torch import load_file
from test_spans import PART2, auc_part1, two_part_task

from llm_attr.data.records import save_jsonl
from llm_attr.methods.daunce import Daunce, DaunceConfig
from llm_attr.methods.daunce_store import score_run
from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig, query_run
from llm_attr.models.lora import LoraArgs

import argparse
_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("--work", default="/tmp/span_two_part", help="a new directory for the runs (refused if not empty)")
d = _ap.parse_args().work
import os
if os.path.isdir(d) and os.listdir(d):
    raise SystemExit(f"{d}: not empty; choose a new --work")
os.makedirs(d, exist_ok=True)
train, query = two_part_task(n_query=8)
save_jsonl(train, f"{d}/train.jsonl"); save_jsonl(query, f"{d}/query.jsonl")
part = np.array([1 if r["id"].startswith("p1") else 2 for r in train])
def prec(S, want):  # fraction of the right subset among each query's top 16
    top = np.argsort(-np.asarray(S), 1)[:, :16]
    return float((part[top] == want).mean())
rows = []
def add(name, S):
    S = load_file(S)["scores"]
    rows.append((name, auc_part1(S, part), prec(S, 1), prec(S, 2)))
Daunce(DaunceConfig(perturbations=16, max_steps=10, batch_size=8, max_length=64, learning_rate=1e-2,
                    lora=LoraArgs(rank=4, alpha=8.0), keep_adapters=False)).run(
    "builtin:tiny", f"{d}/train.jsonl", f"{d}/query.jsonl", f"{d}/daunce", score=False)
for measure, signal in [("cov", "loss"), ("corr", "margin")]:
    for span, label in [("response", "whole response"), ("metadata", "part 1 (metadata.span)"), (PART2, "part 2 (regex)")]:
        score_run(f"{d}/daunce", measure=measure, signal=signal, query_span=span)
        add(f"Daunce K=16 {measure}-{signal}, {label}", f"{d}/daunce/scores.safetensors")
for method in ["grad-dot", "if-ekfac"]:
    GradientAttribution(GradientConfig(method=method, params="adapted", projection_rank=16, max_length=64)).run(
        "builtin:tiny", f"{d}/train.jsonl", f"{d}/query.jsonl", f"{d}/{method}")
    add(f"{method} (rank 16), whole response", f"{d}/{method}/scores.safetensors")
    for i, (span, label) in enumerate([("metadata", "part 1 (metadata.span)"), (PART2, "part 2 (regex)")]):
        query_run(f"{d}/{method}", f"{d}/query.jsonl", f"{d}/{method}-q{i}", query_span=span)
        add(f"{method} (rank 16), {label}", f"{d}/{method}-q{i}/scores.safetensors")
print("| method, measurement | AUC(subset 1 > subset 2) | subset 1 in top 16 | subset 2 in top 16 |")
print("|---|---:|---:|---:|")
for n, a, p1, p2 in rows:
    print(f"| {n} | {a:.2f} | {p1:.2f} | {p2:.2f} |")
