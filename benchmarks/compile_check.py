"""Does `torch.compile` pay for itself on this model and machine? A plain transformers + peft LoRA step, eager
against compiled, in one process, same data.

    python benchmarks/compile_check.py --model builtin:smollm2-135m --json benchmarks/results/compile.json
    python benchmarks/compile_check.py --model builtin:tiny            # seconds: checks the machinery

Measures, for a rank-16 LoRA on every attention and MLP projection (batch `--batch` x `--length` tokens):
- the compile time (first compiled call, minus one eager call);
- the median time of a training step (forward, backward, AdamW) and of an inference forward, eager and compiled;
- the break-even step count, compile time / (eager step - compiled step): how many steps a run must take before
  compiling is faster end to end; and the max |Δ| of the losses (compiled against eager, same weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def build(model_name: str, rank: int):
    from peft import LoraConfig, get_peft_model

    from llm_attr.models.loading import load_model

    loaded = load_model(model_name)
    peft_model = get_peft_model(loaded.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    return peft_model, loaded.tokenizer.vocab_size if hasattr(loaded.tokenizer, "vocab_size") else 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, vocab = build(args.model, args.rank)
    ids = torch.randint(0, min(vocab, 2000), (args.batch, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights stay put

    def step(net):
        def run():
            loss = net(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
        return run

    def infer(net):
        def run():
            with torch.no_grad():
                return float(net(**batch).loss)
        return run

    compiled = torch.compile(model)
    first = {}
    for mode, run in (("train", step), ("infer", infer)):  # first calls: eager, then compiled (compiles)
        model.train(mode == "train")
        t0 = time.perf_counter()
        run(model)()
        eager_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(compiled)()
        first[mode] = time.perf_counter() - t0 - eager_first
    # then eager and compiled calls interleaved, so that load from other work falls on both sides alike
    times = {key: [] for key in ("eager_step", "compiled_step", "eager_infer", "compiled_infer")}
    losses = {}
    for _ in range(args.reps):
        for mode, run in (("step", step), ("infer", infer)):
            model.train(mode == "step")
            for side, net in (("eager", model), ("compiled", compiled)):
                t0 = time.perf_counter()
                value = run(net)()
                times[f"{side}_{mode}"].append(time.perf_counter() - t0)
                if mode == "step":
                    losses[side] = value  # same weights (lr 0): the two sides' losses must agree
    eager_step, compiled_step, eager_infer, compiled_infer = (statistics.median(times[k]) for k in times)
    compile_train, compile_infer = first["train"], first["infer"]
    eager_loss, compiled_loss = losses["eager"], losses["compiled"]
    saved = eager_step - compiled_step
    result = {
        "model": args.model, "batch": args.batch, "length": args.length, "rank": args.rank,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "eager_step_s": round(eager_step, 3), "compiled_step_s": round(compiled_step, 3),
        "step_speedup": round(eager_step / compiled_step, 3), "compile_train_s": round(compile_train, 1),
        "eager_infer_s": round(eager_infer, 3), "compiled_infer_s": round(compiled_infer, 3),
        "infer_speedup": round(eager_infer / compiled_infer, 3), "compile_infer_s": round(compile_infer, 1),
        "break_even_steps": round(compile_train / saved, 1) if saved > 0 else None,
        "loss_abs_diff": abs(eager_loss - compiled_loss),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
