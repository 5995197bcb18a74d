"""The one fine-tuning loop: LoRA, AdamW, cosine schedule with warm-up, accumulation, clipping, per-example weights.

Every method that trains (finetune, Daunce perturbations, further training, retraining for LDS) calls `train`.
The objective is pluggable: `objective(model, batch, logits) -> [B]` per-example values, averaged with weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .data.tokenize import Example, collate
from .errors import LlmAttrError
from .losses import forward_logits, per_example_loss
from .utils import progress

logger = logging.getLogger(__name__)

Objective = Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor]


class TrainingError(LlmAttrError):
    """Training diverged (non-finite loss)."""


@dataclass
class TrainingArgs:
    """Optimisation settings shared by every command that trains."""

    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 3e-4
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("one of epochs or max_steps must be > 0")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    loss_history: list[float] = field(default_factory=list)


def plain_objective(model, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """Per-example mean NLL over response tokens `[B]`."""
    return per_example_loss(logits, batch["labels"].to(logits.device))


def _num_steps(args: TrainingArgs, n_examples: int, world: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_step = args.batch_size * args.gradient_accumulation_steps * world
    return max(1, math.ceil(args.epochs * n_examples / per_step))


def train(
    model: torch.nn.Module,
    examples: list[Example],
    args: TrainingArgs,
    pad_id: int,
    *,
    accelerator=None,
    objective: Objective = plain_objective,
    weights: torch.Tensor | None = None,
    subset: list[int] | None = None,
    data_parallel: bool = True,
    desc: str = "fine-tuning",
    show_progress: bool = True,
    optimizer: str = "adamw",
    scheduler: str = "cosine",
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` on `examples` (optionally a `subset` of positions, `weights [N]`).

    With `data_parallel=True` under a multi-process `accelerate launch`, the model is wrapped for data parallelism
    (one model, batches split over processes). With `data_parallel=False` each process trains its own model on all of
    its data (Daunce perturbations: independent models, no gradient all-reduce).
    Returns the number of optimiser steps and the final (smoothed) training objective.
    `optimizer`: adamw (default) | sgd (plain, no momentum); `scheduler`: cosine (with warm-up, default) | constant.
    `on_step(step)` is called after every optimiser step (e.g. to record query losses at a budget grid).
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    positions = list(range(len(examples))) if subset is None else list(subset)
    if not positions:
        raise TrainingError("nothing to train on: the subset is empty")
    world = accelerator.num_processes if data_parallel else 1
    steps = _num_steps(args, len(positions), world)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters (attach a LoRA adapter first)")
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if scheduler == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * steps), steps)
    elif scheduler == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"scheduler must be 'cosine' or 'constant', got {scheduler!r}")
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        [examples[i] for i in positions],
        batch_size=args.batch_size,
        shuffle=True,
        generator=gen,
        collate_fn=lambda b: collate(b, pad_id),
        drop_last=False,
    )
    if data_parallel and accelerator.num_processes > 1:
        model, opt, loader = accelerator.prepare(model, opt, loader)
    device = accelerator.device
    weights = weights.to(device) if weights is not None else None
    model.train()
    history: list[float] = []
    ema = None
    step, micro = 0, 0
    bar = progress(total=steps, desc=desc, disable=not (show_progress and accelerator.is_local_main_process))
    while step < steps:
        for batch in loader:
            with accelerator.autocast():
                logits = forward_logits(model, batch)
                values = objective(model, batch, logits)
            if weights is not None:
                values = values * weights[batch["index"].to(device)]
            loss = values.mean() / args.gradient_accumulation_steps
            if not torch.isfinite(loss):
                ids = [examples[i].id for i in batch["index"].tolist()]
                raise TrainingError(f"non-finite loss at step {step} on examples {ids}")
            accelerator.backward(loss)
            micro += 1
            if micro % args.gradient_accumulation_steps:
                continue
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            value = loss.item() * args.gradient_accumulation_steps
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            history.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}")
            if on_step is not None:
                on_step(step)
            if step >= steps:
                break
    bar.close()
    model.eval()
    return TrainResult(steps=step, final_loss=float(ema), loss_history=history)
