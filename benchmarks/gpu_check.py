"""The GPU check: every device-specific path in one short script (at most ~10 minutes on one GPU).

    python benchmarks/gpu_check.py                          # CUDA: SmolLM2 in bf16; CPU: builtin:tiny in fp32
    python benchmarks/gpu_check.py --model builtin:smollm2-135m --n-train 128 --json out.json

Steps (each reported with its wall time; a step this machine cannot run says why in one line and is skipped):
1. fine-tuning (precision `auto`: bf16 on a GPU that has it) against a plain transformers+peft loop of the same
   model, adapter, batches and precision: tokens/s of each;
2. Daunce (K=4, the frozen-prefix cache on the last 4 layers) and grad-cos on the device, and the same runs on the
   CPU in fp32: Spearman correlation of each query's scores (mean over queries);
3. 4-bit QLoRA (bitsandbytes, CUDA only): fine-tuning and grad-cos gradients on the quantised base;
4. `accelerate launch --num_processes 2` Daunce (CPU processes) against one process: the largest score difference.
Writes `--json` (default benchmarks/results/gpu_check.json on CUDA, gpu_check_cpu.json elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("LLM_ATTR_PROGRESS", "0")


def spearman_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Spearman correlation of `a[i]` and `b[i]` (`[Q, N]` each)."""
    from scipy.stats import spearmanr

    return float(np.mean([spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]))


def scores_of(run: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(run / "scores.safetensors"))["scores"]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, value


def plain_epoch_tokens_per_s(model_dir: str, train: list, precision: str, device: str,
                             batch_size: int) -> tuple[float, int]:
    """One epoch of a plain transformers+peft loop (rank-16 LoRA, AdamW, `labels=` loss), loading included:
    (tokens/s, tokens)."""
    from peft import LoraConfig, get_peft_model

    from llm_attr.data.records import as_records
    from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
    from llm_attr.losses import autocast
    from llm_attr.models.loading import load_model

    t0 = time.perf_counter()
    loaded = load_model(model_dir, device=device)
    model = get_peft_model(loaded.model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    examples, _ = tokenize_records(as_records(train), loaded.tokenizer, 256)
    pad = pad_id_of(loaded.tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s : s + batch_size], pad).items()}
        with autocast(precision, device):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0), tokens


def library_epoch_tokens_per_s(model_dir: str, train: list, precision: str, device: str,
                              batch_size: int) -> float:
    """The same epoch through llm_attr's own loop (`training.train`, plain loss), loading included: tokens/s."""
    from llm_attr.data.records import as_records
    from llm_attr.data.tokenize import pad_id_of, tokenize_records
    from llm_attr.models.loading import load_model
    from llm_attr.models.lora import LoraArgs, attach_lora
    from llm_attr.training import TrainingArgs
    from llm_attr.training import train as train_loop

    t0 = time.perf_counter()
    loaded = load_model(model_dir, device=device)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    model = attach_lora(loaded.model, LoraArgs(rank=16, alpha=32.0))
    examples, _ = tokenize_records(as_records(train), loaded.tokenizer, 256)
    args = TrainingArgs(epochs=1.0, batch_size=batch_size, learning_rate=1e-4, precision=precision, warmup_ratio=0.0)
    train_loop(model, examples, args, pad_id_of(loaded.tokenizer), show_progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(e.n_tokens for e in examples) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--model", default="builtin:smollm2-135m" if cuda else "builtin:tiny")
    ap.add_argument("--n-train", type=int, default=128 if cuda else 48)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llm_attr_gpu_check")
    ap.add_argument("--json", type=Path,
                    default=REPO / "benchmarks" / "results" / ("gpu_check.json" if cuda else "gpu_check_cpu.json"))
    args = ap.parse_args()

    from llm_attr.config import load_config
    from llm_attr.data.realistic_backdoor import make_realistic_backdoor
    from llm_attr.data.records import save_jsonl
    from llm_attr.finetune import FinetuneConfig, finetune
    from llm_attr.methods.daunce import Daunce, DaunceConfig
    from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig
    from llm_attr.models.builtin import builtin_model_path
    from llm_attr.models.lora import LoraArgs

    device = "cuda" if cuda else "cpu"
    precision = "auto" if cuda else "fp32"
    work = args.work / args.model.replace(":", "-")
    work.mkdir(parents=True, exist_ok=True)
    train, queries, _ = make_realistic_backdoor(n_train=args.n_train, n_query=4, poison_fraction=0.1, seed=0)
    save_jsonl(train, work / "train.jsonl")
    save_jsonl(queries, work / "query.jsonl")
    out: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "model": args.model,
                 "precision": precision, "torch": torch.__version__, "n_train": len(train), "steps": {}}
    steps = out["steps"]

    def report(name: str, **figures) -> None:
        steps[name] = figures
        print(f"{name:<28} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in figures.items()), flush=True)

    # 1. fine-tuning against a plain loop
    cfg = load_config(FinetuneConfig, None, {"epochs": 1.0, "batch_size": 8, "max_length": 256, "precision": precision,
                                             "lora": {"rank": 16, "alpha": 32.0}, "save_steps": 0})
    seconds, target = timed(lambda: finetune(args.model, work / "train.jsonl", work / "target", cfg, overwrite=True))
    model_dir = str(builtin_model_path(args.model)) if args.model.startswith("builtin:") else args.model
    plain, _ = plain_epoch_tokens_per_s(model_dir, train, precision, device, 8)
    ours = library_epoch_tokens_per_s(model_dir, train, precision, device, 8)
    report("finetune epoch (loading included)", target_run_seconds=seconds, tokens_per_s=ours,
           plain_loop_tokens_per_s=plain, ratio_to_plain=ours / plain)

    # 2. Daunce and grad-cos on the device, and (on a GPU) the same runs on the CPU in fp32 in a fresh process
    daunce_set = {"perturbations": 4, "max_length": 256, "lora.rank": 16, "lora.alpha": 32.0, "lora.layers": 4}
    lora = LoraArgs(rank=16, alpha=32.0, layers=4)
    seconds, _ = timed(lambda: Daunce(DaunceConfig(perturbations=4, max_length=256, precision=precision, lora=lora))
                       .run(str(target), work / "train.jsonl", work / "query.jsonl", work / "daunce-device"))
    report("daunce K=4 (device)", seconds=seconds)
    seconds, _ = timed(lambda: GradientAttribution(GradientConfig(method="grad-cos", max_length=256)).run(
        str(target), work / "train.jsonl", work / "query.jsonl", work / "grad-cos-device"))
    report("grad-cos (device)", seconds=seconds)
    if cuda:
        cpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        common = ["--model", str(target), "--train", str(work / "train.jsonl"), "--query", str(work / "query.jsonl")]
        for name, command, sets in (("daunce", "daunce", {**daunce_set, "precision": "fp32"}),
                                    ("grad-cos", "gradients", {"method": "grad-cos", "max_length": 256})):
            cmd = [sys.executable, "-m", "llm_attr", command, *common, "--out", str(work / f"{name}-cpu_fp32")]
            for key, value in sets.items():
                cmd += ["--set", f"{key}={value}"]
            seconds, proc = timed(lambda c=cmd: subprocess.run(c, env=cpu, capture_output=True, text=True))
            if proc.returncode:
                report(f"{name} cpu fp32", failed=(proc.stderr.strip().splitlines() or ["?"])[-1][:200])
                continue
            report(f"{name} cpu fp32", seconds=seconds,
                   spearman_device_vs_cpu_fp32=spearman_rows(scores_of(work / f"{name}-device"),
                                                             scores_of(work / f"{name}-cpu_fp32")))

    # 3. QLoRA
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = cuda
    except ImportError:
        has_bnb = False
    if has_bnb:
        qcfg = load_config(FinetuneConfig, None, {"epochs": 1.0, "batch_size": 8, "max_length": 256,
                                                  "quantization": "4bit", "lora": {"rank": 16}, "save_steps": 0})
        seconds, qtarget = timed(lambda: finetune(args.model, work / "train.jsonl", work / "qlora", qcfg,
                                                  overwrite=True))
        report("qlora finetune (4-bit)", seconds=seconds)
        seconds, _ = timed(lambda: GradientAttribution(GradientConfig(method="grad-cos", max_length=256)).run(
            str(qtarget), work / "train.jsonl", work / "query.jsonl", work / "qlora-grad-cos"))
        report("qlora grad-cos", seconds=seconds,
               spearman_vs_bf16=spearman_rows(scores_of(work / "qlora-grad-cos"), scores_of(work / "grad-cos-device")))
    else:
        report("qlora", skipped="4-bit QLoRA needs CUDA and bitsandbytes (pip install '.[quant]')")

    # 4. two accelerate processes against one
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "-m", "llm_attr", "daunce", "--model", str(target), "--train", str(work / "train.jsonl"), "--query",
           str(work / "query.jsonl"), "--out", str(work / "daunce-2proc"), "--set", "precision=fp32"]
    for key, value in daunce_set.items():
        cmd += ["--set", f"{key}={value}"]
    seconds, proc = timed(lambda: subprocess.run(cmd, env=env, capture_output=True, text=True))
    if proc.returncode:
        report("accelerate 2 processes", failed=proc.stderr.strip().splitlines()[-1][:200])
    else:
        one = work / ("daunce-cpu_fp32" if cuda else "daunce-device")  # both fp32 on CPU processes
        diff = float(np.abs(scores_of(work / "daunce-2proc") - scores_of(one)).max())
        report("accelerate 2 processes", seconds=seconds, max_score_difference_vs_one=diff)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
