"""Daunce cost on this machine: one perturbation vs a plain LoRA fine-tune epoch, signal evaluation vs inference.

    python benchmarks/daunce.py [--models tiny llama30m] [--repeats 5] [--json benchmarks/results/daunce.json]

For each model (builtin:tiny, and a ~30M-parameter Llama with random weights built on the fly with the tiny
tokenizer) on the demo's backdoor data (240 training records, 32 queries) and the default config
(configs/daunce.yaml: rank-64 LoRA, 1 epoch = 15 steps of 16):

- `timing` (one process, the pairs interleaved so that both sides see the same load; medians of `--repeats`):
  a plain LoRA fine-tune epoch (a plain transformers loop: `model(..., labels=...).loss.backward()`, AdamW with
  the same schedule, clipping, batches and rank-64 adapter; also `training.train`, our own loop with the plain
  loss, reported beside it) against one Daunce
  perturbation (training on the first-order objective, θ₀ cache built once per run and reported apart, then
  both signals of all 272 examples: the loss-matrix row); plain batched inference (logits only) against
  `losses.evaluate_signal` (loss and margin rows) over the same 272 examples and batches.
- `finetune`, `daunce` (a fresh process each): peak resident memory (`VmHWM`) of one plain epoch, and of one
  Daunce perturbation with its θ₀ cache and evaluation, next to the memory after loading the model.

Goals from issue 4: perturbation <= 1.3x a fine-tune epoch; loss-matrix throughput >= 0.9x plain inference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = ("tiny", "llama30m")
PHASES = ("timing", "finetune", "daunce")


def build_llama30m(folder: Path) -> str:
    """A ~30M-parameter Llama (hidden 512, 10 layers, random weights; as benchmarks/gradients.py) with builtin:tiny's
    tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm_attr.models.builtin import builtin_model_path

    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("builtin:tiny"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1408, num_hidden_layers=10,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rss_mib(field: str = "VmHWM") -> float:
    """`VmHWM` (peak) or `VmRSS` (current) of this process in MiB; ru_maxrss would carry the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_phase(model_spec: str, phase: str, repeats: int, n_train: int = 240, overrides: dict | None = None) -> dict:
    """One phase in this process; returns its figures.

    `overrides`: DaunceConfig fields (e.g. `{"precision": "bf16", "lora": {"layers": 4}}`); with `lora.layers` the
    perturbation runs over the frozen-prefix cache as `Daunce.run` does (built once, reported apart), while the
    plain epoch and plain inference baselines run the whole model. Both sides use the same `precision`.
    """
    import contextlib

    from accelerate import Accelerator

    from llm_attr.config import load_config
    from llm_attr.data.backdoor import make_backdoor_task
    from llm_attr.data.records import as_records
    from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
    from llm_attr.losses import autocast, evaluate_signal, forward_logits
    from llm_attr.methods.daunce import (
        SIGNALS,
        DaunceConfig,
        PerturbationModel,
        Theta0,
        perturbation_objective,
        perturbation_plan,
    )
    from llm_attr.methods.daunce_objective import reweighting
    from llm_attr.models.loading import load_model
    from llm_attr.models.prefix_cache import PrefixCache, first_trainable_layer
    from llm_attr.training import plain_objective, train

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    train_records, queries, _ = make_backdoor_task(n_train=n_train, n_query=max(4, n_train // 8), fraction=0.05,
                                                   seed=0)
    loaded = load_model(model_spec, device=accelerator.device)
    cfg = load_config(DaunceConfig, None, overrides or {})
    amp = lambda: autocast(cfg.precision, accelerator.device)  # noqa: E731
    examples, _ = tokenize_records(as_records(train_records), loaded.tokenizer, cfg.max_length)
    query_ex, _ = tokenize_records(as_records(queries), loaded.tokenizer, cfg.max_length)
    every = examples + query_ex
    pad = pad_id_of(loaded.tokenizer)
    out: dict = {"model": model_spec, "phase": phase, "parameters": sum(p.numel() for p in loaded.model.parameters()),
                 "n_train": len(examples), "n_query": len(query_ex), "threads": torch.get_num_threads(),
                 "rss_after_load_mib": rss_mib("VmRSS")}
    pm = PerturbationModel(loaded.model, "new", cfg.lora)
    out["lora_parameters"] = sum(p.numel() for p in pm.trainable.values())
    out["config"] = {"precision": cfg.precision, "lora_layers": cfg.lora.layers, "lora_rank": cfg.lora.rank}
    cache = None
    if first_trainable_layer(pm.model) > 0:
        t0 = time.perf_counter()
        cache = PrefixCache(pm.model, first_trainable_layer(pm.model))
        cache.add(every, pad, batch_size=cfg.eval_batch_size, autocast=amp)
        out["prefix_cache_seconds"] = time.perf_counter() - t0

    def cached():
        return cache.active() if cache is not None else contextlib.nullcontext()

    def library_epoch() -> None:
        pm.reset(0)
        train(pm.model, examples, cfg, pad, accelerator=accelerator, objective=plain_objective,
              data_parallel=False, show_progress=False)

    def plain_epoch() -> None:
        """The hardware's own baseline: one epoch of a plain transformers training loop, nothing of ours but the
        collation (which our loop does too)."""
        import math

        from transformers import get_cosine_schedule_with_warmup

        pm.reset(0)
        params = [p for p in pm.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        steps = math.ceil(len(examples) / cfg.batch_size)
        sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        pm.model.train()
        for s in range(0, len(order), cfg.batch_size):
            batch = collate([examples[i] for i in order[s:s + cfg.batch_size]], pad)
            with amp():
                loss = pm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        pm.model.eval()

    def perturbation(k: int, theta0) -> tuple[float, float]:
        plan = perturbation_plan(cfg.seed, k, len(examples), cfg.subsample_ratio)
        pm.reset(plan.init_seed)
        weights = reweighting(plan.xi, cfg.rho).to(accelerator.device)
        t0 = time.perf_counter()
        with cached():
            train(pm.model, examples, cfg, pad, accelerator=accelerator, objective=perturbation_objective(
                theta0, weights, cfg.gamma), subset=plan.subset.tolist(), data_parallel=False, show_progress=False)
        t1 = time.perf_counter()
        with cached():
            for side in (examples, query_ex):  # the loss-matrix row, as Daunce.run computes it
                evaluate_signal(pm.model, side, pad, batch_size=cfg.eval_batch_size, signal=SIGNALS,
                                precision=cfg.precision)
        return t1 - t0, time.perf_counter() - t1

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if phase == "finetune":
        out["seconds"] = timed(plain_epoch)
    elif phase == "daunce":
        t0 = time.perf_counter()
        with cached():
            theta0 = Theta0(pm.model, examples, pad, pm.reference, cfg.theta0_cache_mb, cfg.eval_batch_size)
        out["theta0_cache_seconds"] = time.perf_counter() - t0
        out["train_seconds"], out["evaluate_seconds"] = perturbation(0, theta0)
    else:
        t0 = time.perf_counter()
        with cached():
            theta0 = Theta0(pm.model, examples, pad, pm.reference, cfg.theta0_cache_mb, cfg.eval_batch_size)
        out["theta0_cache_seconds"] = time.perf_counter() - t0
        order = sorted(range(len(every)), key=lambda i: every[i].n_tokens)
        batches = [collate([every[i] for i in order[s:s + cfg.eval_batch_size]], pad)
                   for s in range(0, len(order), cfg.eval_batch_size)]

        @torch.no_grad()
        def inference() -> None:
            pm.model.eval()
            for batch in batches:
                with amp():
                    forward_logits(pm.model, batch)

        from llm_attr.methods.daunce_newton import NewtonSolver

        pm.reset(0)
        t0 = time.perf_counter()  # solver newton's once-per-run part: θ₀'s K-FAC factors over the training set
        with cached():
            newton = NewtonSolver(pm, examples, pad, batch_size=cfg.batch_size, precision=cfg.precision,
                                  damping=cfg.newton_damping, gamma=cfg.gamma, damping_rule=cfg.newton_damping_rule)
        out["newton_factors_seconds"] = time.perf_counter() - t0

        def newton_step(k: int) -> None:  # one perturbation's step (its rows cost what `evaluate` costs)
            plan = perturbation_plan(cfg.seed, k, len(examples), cfg.subsample_ratio)
            pm.reset(plan.init_seed)
            with cached():
                newton.apply(newton.direction(newton.coefficients(cfg, plan.xi), plan.subset.tolist()), 1e-3)

        plain_epoch()  # warm-up
        library_epoch()
        rows: dict[str, list[float]] = {"epoch": [], "library_epoch": [], "train": [], "evaluate": [],
                                        "inference": [], "signal": [], "newton_step": []}
        for k in range(repeats):  # interleaved: each pair sees the same load
            rows["epoch"].append(timed(plain_epoch))
            rows["library_epoch"].append(timed(library_epoch))
            train_s, eval_s = perturbation(k, theta0)
            rows["train"].append(train_s)
            rows["evaluate"].append(eval_s)
            rows["newton_step"].append(timed(lambda k=k: newton_step(k)))
            rows["inference"].append(timed(inference))
            rows["signal"].append(timed(lambda: evaluate_signal(pm.model, every, pad, batch_size=cfg.eval_batch_size,
                                                                signal=SIGNALS, precision=cfg.precision)))
        out["raw"] = rows
        out.update({f"{k}_seconds": statistics.median(v) for k, v in rows.items()})
        out["perturbation_seconds"] = statistics.median(
            [a + b for a, b in zip(rows["train"], rows["evaluate"], strict=True)])
        out["examples"] = len(every)
    out["peak_rss_mib"] = rss_mib("VmHWM")
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/daunce.json")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one phase in a child process
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("LLM_ATTR_PROGRESS", "0")
    if args.phase:
        import logging

        logging.disable(logging.WARNING)
        print("RESULT " + json.dumps(run_phase(args.spec, args.phase, args.repeats)))
        return
    cache = Path(os.environ.get("LLM_ATTR_CACHE", Path(tempfile.gettempdir()) / "llm_attr_bench"))
    specs = {"tiny": "builtin:tiny"}
    if "llama30m" in args.models:
        specs["llama30m"] = build_llama30m(cache / "bench" / "llama30m")
    results = []
    for name in args.models:
        row: dict = {"model": name}
        for phase in PHASES:
            proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--spec", specs[name],
                                   "--repeats", str(args.repeats)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{name}/{phase} failed:\n{proc.stderr[-3000:]}")
            row[phase] = json.loads(lines[-1][7:])
        t = row["timing"]
        row["summary"] = {
            "parameters_M": t["parameters"] / 1e6,
            "lora_parameters_M": t["lora_parameters"] / 1e6,
            "finetune_epoch_s": t["epoch_seconds"],
            "perturbation_s": t["perturbation_seconds"],
            "perturbation_train_s": t["train_seconds"],
            "perturbation_evaluate_s": t["evaluate_seconds"],
            "theta0_cache_s": t["theta0_cache_seconds"],
            "perturbation_ratio": t["perturbation_seconds"] / t["epoch_seconds"],
            "perturbation_train_ratio": t["train_seconds"] / t["epoch_seconds"],
            "inference_examples_per_s": t["examples"] / t["inference_seconds"],
            "signal_examples_per_s": t["examples"] / t["signal_seconds"],
            "throughput_ratio": t["inference_seconds"] / t["signal_seconds"],
            "rss_after_load_mib": row["finetune"]["rss_after_load_mib"],
            "peak_rss_finetune_mib": row["finetune"]["peak_rss_mib"],
            "peak_rss_daunce_mib": row["daunce"]["peak_rss_mib"],
            "newton_step_s": t["newton_step_seconds"],  # solver newton: one step, against AdamW's `train`
            "newton_step_ratio": t["newton_step_seconds"] / t["train_seconds"],
            "newton_factors_s": t["newton_factors_seconds"],
        }
        results.append(row)
    print(f"{'model':<9} {'params':>7} {'epoch s':>8} {'pert. s':>8} {'train':>6} {'eval':>6} {'ratio':>6} "
          f"{'train ratio':>11} {'infer ex/s':>10} {'signal ex/s':>11} {'ratio':>6} {'RSS MiB load/ft/daunce':>23}")
    for row in results:
        s = row["summary"]
        rss = f"{s['rss_after_load_mib']:.0f}/{s['peak_rss_finetune_mib']:.0f}/{s['peak_rss_daunce_mib']:.0f}"
        print(f"{row['model']:<9} {s['parameters_M']:>6.1f}M {s['finetune_epoch_s']:>8.2f} {s['perturbation_s']:>8.2f} "
              f"{s['perturbation_train_s']:>6.2f} {s['perturbation_evaluate_s']:>6.2f} {s['perturbation_ratio']:>6.2f} "
              f"{s['perturbation_train_ratio']:>11.2f} {s['inference_examples_per_s']:>10.0f} "
              f"{s['signal_examples_per_s']:>11.0f} {s['throughput_ratio']:>6.2f} {rss:>23}")
        print(f"{'':<9} solver newton: one step {s['newton_step_s']:.2f} s ({s['newton_step_ratio']:.2f}x AdamW's "
              f"training), K-FAC factors once {s['newton_factors_s']:.2f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
