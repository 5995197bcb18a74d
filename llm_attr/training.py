"""The one fine-tuning loop: LoRA, AdamW, cosine schedule with warm-up, accumulation, clipping, per-example weights.

Every method that trains (finetune, Daunce perturbations, further training, retraining for LDS) calls `train`.
The objective is pluggable: `objective(model, batch, logits) -> [B]` per-example values, averaged with weights.

The data order is a function of (seed, epoch) alone and, with `checkpoint=Checkpointing(...)`, the loop saves its
whole state (trainable weights, optimiser moments, RNG, position in the epoch) every `every` steps as safetensors,
so a killed run resumes where it stopped and ends bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.tokenize import Example, collate, token_lengths
from .errors import LlmAttrError, RunDirError
from .faults import fault_point
from .io import atomic_write
from .losses import PRECISIONS, autocast, forward_logits, per_example_loss, response_window
from .utils import progress

logger = logging.getLogger(__name__)

#: `(model, batch, logits) -> [B]` per-example values to minimise. `logits [B, W, V]` are those of the batch's last
#: W positions, the response window (`losses.response_window`: every response token and the position before it),
#: and `batch["labels"]` is cut to the same `[B, W]`; `batch["input_ids"]` etc. stay whole.
Objective = Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor]


class TrainingError(LlmAttrError):
    """Training diverged (non-finite loss)."""


@dataclass
class TrainingArgs:
    """Optimisation settings shared by every command that trains."""

    epochs: float = field(default=3.0, metadata={"help": "passes over the training set (ignored when max_steps > 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimiser steps; > 0 overrides epochs"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate of the optimiser"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimiser step (before gradient accumulation)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches accumulated into one optimiser step"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of the steps with a linear learning-rate warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0: none)"})
    max_length: int = field(default=512, metadata={"help": "tokens per example; longer ones lose prompt tokens from the left first"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA initialisation, dropout and data order"})
    precision: str = field(default="fp32", metadata={"help": (
        "matmul precision of forward and backward passes: fp32, or bf16 (autocast; weights, optimiser and losses "
        "stay fp32); auto: bf16 where the device computes it natively (CUDA with bf16, a CPU with AMX or "
        "avx512_bf16), fp32 elsewhere")})
    group_by_length: bool = field(default=False, metadata={"help": (
        "batch examples of similar length (shuffled blocks of 50 batches, each sorted by length, the batches "
        "then shuffled): less padding computed, a different but equally random batch order")})

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
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
    resumed_from: int = 0  # the checkpoint's step this run started from (0: from scratch)


@dataclass
class Checkpointing:
    """Save the training state to `folder` every `every` optimiser steps (and at the last); resume from it.

    A checkpoint of a run with another `fingerprint` (model, data, config) is never resumed.
    """

    folder: Path
    every: int
    fingerprint: str
    keep: int = 2  # per process: with several processes, one may die before writing the checkpoint another wrote


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of `range(n)` per epoch that depends only on (seed, epoch): a resumed run sees the same order."""

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        if self.lengths is None:
            return iter(order)
        # group by length: blocks of 50 batches sorted by length, cut into batches, the batches shuffled
        block = 50 * self.batch_size
        batches = []
        for s in range(0, self.n, block):
            part = sorted(order[s : s + block], key=lambda i: -self.lengths[i])
            batches += [part[b : b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        perm = torch.randperm(len(full), generator=gen).tolist()  # a short batch stays last: the loader's cuts hold
        return iter([i for b in perm for i in full[b]] + [i for b in batches if len(b) < self.batch_size for i in b])


def _checkpoint_steps(ckpt: Checkpointing, rank: int) -> list[int]:
    return sorted(int(p.stem.split("-step")[1]) for p in ckpt.folder.glob(f"rank{rank}-step*.safetensors"))


def _save_checkpoint(ckpt: Checkpointing, rank: int, model, opt, position: dict) -> None:
    """Write `rank{r}-step{s}.safetensors` (trainable weights, optimiser state, RNG; the position as metadata)."""
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state = opt.state_dict()
    scalars: dict = {}
    for i, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"position": json.dumps(position), "fingerprint": ckpt.fingerprint,
            "param_groups": json.dumps(state["param_groups"]), "opt_scalars": json.dumps(scalars)}
    step = position["step"]

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=meta)
        fault_point("checkpoint_write")

    atomic_write(ckpt.folder / f"rank{rank}-step{step:08d}.safetensors", write)
    for old in _checkpoint_steps(ckpt, rank)[: -ckpt.keep]:
        (ckpt.folder / f"rank{rank}-step{old:08d}.safetensors").unlink(missing_ok=True)


def _load_checkpoint(ckpt: Checkpointing, rank: int, world: int, model, opt) -> dict | None:
    """Restore the latest step that every process saved; returns its position, or None to start from scratch."""
    from safetensors import safe_open

    common = set(_checkpoint_steps(ckpt, rank))
    for r in range(world):
        common &= set(_checkpoint_steps(ckpt, r))
    if not common:
        return None
    path = ckpt.folder / f"rank{rank}-step{max(common):08d}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if meta.get("fingerprint") != ckpt.fingerprint:
            raise RunDirError(f"{path}: a checkpoint of another run (its model, data or config differ from this "
                              f"one's); delete {ckpt.folder} or choose another --out")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                params[key.removeprefix("param.")].copy_(value)
    scalars = json.loads(meta["opt_scalars"])
    opt_state: dict = {}
    for key, value in [*((k.removeprefix("opt."), v) for k, v in tensors.items() if k.startswith("opt.")),
                       *scalars.items()]:
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return json.loads(meta["position"])


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
    checkpoint: Checkpointing | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` on `examples` (optionally a `subset` of positions, `weights [N]`).

    With `data_parallel=True` under a multi-process `accelerate launch`, the model is wrapped for data parallelism
    (one model, batches split over processes). With `data_parallel=False` each process trains its own model on all of
    its data (Daunce perturbations: independent models, no gradient all-reduce).
    Returns the number of optimiser steps and the final (smoothed) training objective.
    `optimizer`: adamw (default) | sgd (plain, no momentum); `scheduler`: cosine (with warm-up, default) | constant.
    `on_step(step)` is called after every optimiser step (e.g. to record query losses at a budget grid).
    `checkpoint`: save the state every `checkpoint.every` steps and resume from the latest one found there.
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
    lengths = None
    if args.group_by_length:
        every = token_lengths(examples)
        lengths = [every[i] for i in positions]
    sampler = EpochShuffle(len(positions), args.seed, lengths, args.batch_size)
    loader = torch.utils.data.DataLoader(
        positions,  # the examples themselves are built per batch: no list of N examples in memory
        batch_size=args.batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(args.seed),  # the loader's own draws leave the global RNG alone
        collate_fn=lambda b: collate([examples[i] for i in b], pad_id),
        drop_last=False,
    )
    history: list[float] = []
    ema = None
    step, micro, epoch, seen = 0, 0, 0, 0
    rank = accelerator.process_index if data_parallel else 0
    if checkpoint is not None:
        position = _load_checkpoint(checkpoint, rank, world, model, opt)
        if position is not None:
            step, micro, epoch, seen = position["step"], position["micro"], position["epoch"], position["seen"]
            ema, history = position["ema"], position["history"]
            with warnings.catch_warnings():  # stepping the schedule without optimiser steps is the point here
                warnings.simplefilter("ignore")
                for _ in range(step):
                    sched.step()
            logger.info("resuming from the checkpoint at step %d of %d (%s)", step, steps, checkpoint.folder)
    resumed_from = step
    if data_parallel and accelerator.num_processes > 1:
        model, opt, loader = accelerator.prepare(model, opt, loader)
    device = accelerator.device
    weights = weights.to(device) if weights is not None else None
    model.train()
    bar = progress(total=steps, initial=step, desc=desc,
                   disable=not (show_progress and accelerator.is_local_main_process))
    while step < steps:
        sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, seen) if seen else loader
        finished_epoch = True
        for batch in batches:
            seen += 1
            keep = response_window(batch["labels"])  # the lm_head and the loss only where labels are
            window = {**batch, "labels": batch["labels"][:, -keep:]}
            with accelerator.autocast(), autocast(args.precision, device):
                logits = forward_logits(model, batch, keep_last=keep)
                values = objective(model, window, logits)
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
            if checkpoint is not None and (step % checkpoint.every == 0 or step >= steps):
                position = {"step": step, "micro": micro, "epoch": epoch, "seen": seen, "ema": ema,
                            "history": history}
                _save_checkpoint(checkpoint, rank, accelerator.unwrap_model(model), opt, position)
            fault_point("train_step")
            if step >= steps:
                finished_epoch = False
                break
        if finished_epoch:
            epoch, seen = epoch + 1, 0
    bar.close()
    model.eval()
    return TrainResult(steps=step, final_loss=float(ema), loss_history=history, resumed_from=resumed_from)
