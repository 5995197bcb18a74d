"""The per-example signal every method shares: mean token NLL (or margin) over an example's own response tokens.

One function computes it for training, Daunce loss matrices, evaluation and further training, so they never disagree.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F

from .data.tokenize import IGNORE_INDEX, Example, collate, token_lengths
from .models.lora import merged_lora_forward
from .utils import progress

logger = logging.getLogger(__name__)
Signal = Literal["loss", "margin"]
PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 matmuls natively: CUDA with bf16 support, or a CPU with AMX / avx512_bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16()
    return False


@functools.cache
def _cpu_has_bf16() -> bool:
    """Read once per process: `autocast` asks on every batch."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a `precision` (fp32 | bf16 | auto, see `TrainingArgs.precision`) on `device`."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    enabled = precision == "bf16" or (precision == "auto" and native_bf16(device))
    if precision == "bf16" and device.type == "cpu":
        _warn_emulated_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@functools.cache
def _warn_emulated_bf16() -> None:
    if not _cpu_has_bf16():  # measured on an AMD EPYC without it: a SmolLM2 forward 6x, a LoRA step ~40x fp32's time
        logger.warning("precision bf16 on a CPU without avx512_bf16 / AMX: bf16 is emulated there and far slower "
                       "than fp32; use precision auto (bf16 only where native) or fp32")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k].to(device) if device is not None else batch[k] for k in keys}


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits `[B, T, V]` with next-token labels: (logits `[B, T-1, V]`, targets `[B, T-1]`, mask `[B, T-1]`)."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits, targets.clamp(min=0), mask


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL `[B, T-1]` float32 (0 off the response) and the response mask `[B, T-1]` bool.

    The labels are shifted (position t predicts t + 1, the last position nothing), not the logits: one
    cross-entropy over the contiguous `[B·T, V]` logits, ignored positions skipped (3.6x faster than over a
    shifted, transposed view).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return nll[:, :-1], (targets != IGNORE_INDEX)[:, :-1]


def token_margin(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-odds of the correct token, log p - log(1 - p), `[B, T-1]` float32, and the mask."""
    logits, targets, mask = shifted(logits, labels)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = logp.clamp(max=-1e-6)  # log(1 - p) needs p < 1
    margin = logp - torch.log(-torch.expm1(logp))
    return margin * mask, mask


def reduce_per_example(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each example's own response tokens: `[B, T] -> [B]`."""
    return values.sum(-1) / mask.sum(-1).clamp(min=1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """losses: `[B]` float32, mean token NLL over response tokens."""
    nll, mask = token_nll(logits, labels)
    return reduce_per_example(nll, mask)


def per_example_signal(logits: torch.Tensor, labels: torch.Tensor, signal: Signal = "loss") -> torch.Tensor:
    """`[B]` float32: mean NLL (`loss`) or mean log-odds of the correct token (`margin`) over response tokens."""
    if signal == "loss":
        return per_example_loss(logits, labels)
    if signal == "margin":
        margin, mask = token_margin(logits, labels)
        return reduce_per_example(margin, mask)
    raise ValueError(f"unknown signal {signal!r}; expected 'loss' or 'margin'")


def token_signals(logits: torch.Tensor, labels: torch.Tensor, signals: tuple[Signal, ...] = ("loss", "margin")
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(`b_idx [M]`, `{signal: [M]}` float32): each labelled token's NLL (`loss`) or log-odds (`margin`), the
    labelled tokens in row-major order (`b_idx`: their example). One log-softmax over response rows only.

    A query measured on a span of its response has labels on the span's tokens only (`data.spans`): every
    signal here, and the per-example means below, are then the span's.
    """
    logits, targets, mask = shifted(logits, labels)
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    logp = -F.cross_entropy(logits[b_idx, t_idx].float(), targets[b_idx, t_idx], reduction="none")  # [M]
    out = {}
    for s in signals:
        if s == "loss":
            out[s] = -logp
        elif s == "margin":
            clamped = logp.clamp(max=-1e-6)  # log(1 - p) needs p < 1
            out[s] = clamped - torch.log(-torch.expm1(clamped))
        else:
            raise ValueError(f"unknown signal {s!r}; expected 'loss' or 'margin'")
    return b_idx, out


def per_example_signals(logits: torch.Tensor, labels: torch.Tensor,
                        signals: tuple[Signal, ...] = ("loss", "margin")) -> dict[str, torch.Tensor]:
    """`{signal: [B]}` float32, the values of `per_example_signal`, from one log-softmax over response rows only.

    Evaluation's fast path: prompt and padding positions are skipped and loss and margin share the log-probs.
    """
    b_idx, values = token_signals(logits, labels, signals)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1).to(b_idx.device)
    out = {}
    for s in signals:
        total = torch.zeros(labels.shape[0], dtype=torch.float32, device=b_idx.device).index_add_(0, b_idx, values[s])
        out[s] = total / n_tokens
    return out


def forward_logits(model, batch: dict[str, torch.Tensor], keep_last: int = 0) -> torch.Tensor:
    """logits `[B, T, V]`; with `keep_last` only the last positions' `[B, keep_last, V]` (the lm_head and the
    logits' memory spent where they are used; a model without transformers' `logits_to_keep` computes all)."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    if 0 < keep_last < batch["input_ids"].shape[1]:
        try:
            return model(**inputs, use_cache=False, logits_to_keep=keep_last).logits[:, -keep_last:]
        except TypeError:  # no logits_to_keep in this model's forward
            pass
    logits = model(**inputs, use_cache=False).logits
    return logits[:, -keep_last:] if keep_last else logits


def window_logits(model, batch: dict[str, torch.Tensor], keep: int, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[B, keep, V]`, labels `[B, keep]`) of the last `keep` positions; with a `reduced_head.ReducedHead`,
    its logits over each position's label (index 0), θ₀'s top tokens and one tail logit, and labels to match."""
    if head is not None:
        return head(model, batch, keep)
    return forward_logits(model, batch, keep_last=keep), batch["labels"][:, -keep:]


def response_window(labels: torch.Tensor) -> int:
    """How many last positions hold every response token of the batch and the position before each (`[B, T]`
    labels, right-padded): the logits a per-example loss or margin needs (training and `evaluate_signal`)."""
    has = labels != IGNORE_INDEX
    first = int(torch.where(has.any(1), has.float().argmax(1), labels.shape[1]).min())
    return labels.shape[1] - max(first - 1, 0)


@torch.no_grad()
def evaluate_signal(
    model,
    examples: list[Example],
    pad_id: int,
    *,
    batch_size: int = 32,
    signal: Signal | tuple[Signal, ...] = "loss",
    desc: str | None = None,
    precision: str = "fp32",
    head=None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Per-example signal of every example under `model`: `[N]` float32 in the order of `examples`.

    Examples are batched by length (less padding), results put back in input order. With a tuple of signals,
    one forward pass gives all of them, returned as `{signal: [N]}`. The lm_head runs only from the batch's first
    response token on, and LoRA layers run with their weights summed (`merged_lora_forward`). `precision`: the
    matmuls' (`autocast`); the signals are computed from fp32 logits either way. `head`: a
    `reduced_head.ReducedHead` built for these examples instead of the full lm_head.
    """
    signals = (signal,) if isinstance(signal, str) else tuple(signal)
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=token_lengths(examples).__getitem__)
    out = {s: torch.empty(len(examples), dtype=torch.float32) for s in signals}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in progress(batches, desc=desc, disable=desc is None):
        batch = collate([examples[i] for i in idx], pad_id)
        keep = response_window(batch["labels"])
        with merged_lora_forward(model), autocast(precision, next(model.parameters()).device):
            logits, labels = window_logits(model, batch, keep, head)
        values = per_example_signals(logits, labels.to(logits.device), signals)
        for s in signals:
            out[s][idx] = values[s].cpu()
    model.train(was_training)
    return out[signals[0]] if isinstance(signal, str) else out


@torch.no_grad()
def evaluate_token_signals(model, examples: list[Example], pad_id: int, *, batch_size: int = 32,
                           signals: tuple[Signal, ...] = ("loss", "margin"), precision: str = "fp32",
                           head=None) -> dict[str, list[torch.Tensor]]:
    """`{signal: [tensor [R_i] float32 per example]}`: every labelled (response) token's signal under `model`, in
    the order of `examples` (the per-token measurement; their mean is `evaluate_signal`'s value)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=token_lengths(examples).__getitem__)
    out: dict[str, list] = {s: [None] * len(examples) for s in signals}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([examples[i] for i in idx], pad_id)
        keep = response_window(batch["labels"])
        with merged_lora_forward(model), autocast(precision, next(model.parameters()).device):
            logits, labels = window_logits(model, batch, keep, head)
        b_idx, values = token_signals(logits, labels.to(logits.device), signals)
        counts = torch.bincount(b_idx.cpu(), minlength=len(idx)).tolist()
        for s in signals:
            for i, part in zip(idx, values[s].cpu().split(counts), strict=True):
                out[s][i] = part.clone()
    model.train(was_training)
    return out

