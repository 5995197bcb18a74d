"""θ₀'s lm_head reduced to a few tokens per response position: Daunce's rows at a fraction of the head's cost.

A perturbation moves the hidden state h entering the lm_head a little. At each position t that predicts a
response token y_t, the reduced head keeps the exact logits of y_t and of θ₀'s `top_k` most likely other tokens,
and folds the rest of the vocabulary (the tail T_t) into one logit, linear in h, its first-order expansion at θ₀:

    z_tail(h) = z_tail(h₀) + μ_tᵀ (h − h₀),   z_tail(h₀) = logsumexp_{v∈T_t} z_v(h₀),   μ_t = Σ_{v∈T_t} softmax_T(z(h₀))_v W_v

At θ₀ every loss, margin and gradient equals the full head's (the tail's gradient in h is exactly μ_t). Elsewhere
the error is second order in the tail's logit changes, times the tail's probability mass at θ₀ (logged when
built). The head is built once, by one full-vocabulary pass at θ₀, and keyed by each example's tokens and labels.
A model whose lm_head trains or whose logits are not `W h + b` (soft-capping, scaling) is refused by
`reduced_head`, which then returns None: the caller uses the full head.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass

import torch

from .data.tokenize import IGNORE_INDEX, Example, collate, token_lengths
from .losses import autocast, forward_logits, model_inputs, response_window

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    positions: torch.Tensor  # [P] int64: absolute positions t whose next token is a label
    tokens: torch.Tensor  # [P, 1 + top_k] int64: the label first, then θ₀'s top_k other tokens
    tail_weight: torch.Tensor  # [P, d] float32: μ_t
    tail_bias: torch.Tensor  # [P] float32: z_tail(h₀) − μ_tᵀ h₀


def _key(ids: list[int] | torch.Tensor, labels: list[int] | torch.Tensor) -> bytes:
    ids = torch.as_tensor(ids, dtype=torch.int64)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return hashlib.blake2b(ids.numpy().tobytes() + labels.numpy().tobytes(), digest_size=16).digest()


def _decoder(model):
    from .models.prefix_cache import decoder_parts

    parts = decoder_parts(model)
    return None if parts is None else parts[0]


class ReducedHead:
    """`head(model, batch, keep)` → (logits `[B, keep, 2 + top_k]` float32, labels `[B, keep]`): index 0 is each
    position's label, the last index the tail. Use through `losses.window_logits(..., head=head)`."""

    def __init__(self, model, examples: list[Example], pad_id: int, *, top_k: int, batch_size: int = 32,
                 precision: str = "fp32", reference=contextlib.nullcontext):
        self.top_k = top_k
        lm_head = model.get_output_embeddings()
        self.weight = lm_head.weight.detach().float()  # [V, d]
        self.bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias.detach().float()
        self.entries: dict[bytes, _Entry] = {}
        device = self.weight.device
        order = sorted(range(len(examples)), key=token_lengths(examples).__getitem__)
        tail_mass, n_tok = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad(), reference():
            for start in range(0, len(order), batch_size):
                batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
                keep = response_window(batch["labels"])
                with autocast(precision, device):
                    hidden = self._hidden(model, batch, keep).float()  # [B, keep, d]
                logits = self._full(hidden)  # [B, keep, V]
                if start == 0:
                    self._check(model, batch, keep, logits, precision)
                labels = batch["labels"][:, -keep:].to(device)
                offset = batch["input_ids"].shape[1] - keep
                for b, e in enumerate(batch["input_ids"]):
                    t = (labels[b, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)  # window positions predicting a label
                    if len(t) == 0:
                        continue
                    y = labels[b, t + 1]
                    z = logits[b, t]  # [P, V]
                    others = z.scatter(1, y[:, None], float("-inf"))
                    top = others.topk(min(top_k, z.shape[1] - 1), dim=1).indices  # [P, top_k]
                    tail = z.scatter(1, torch.cat([y[:, None], top], 1), float("-inf"))
                    probs = torch.softmax(tail, dim=1)  # the tail's own distribution
                    mu = probs @ self.weight  # [P, d]
                    z_tail = torch.logsumexp(tail, dim=1)
                    h0 = hidden[b, t]
                    tail_mass += float(torch.exp(z_tail - torch.logsumexp(z, dim=1)).sum())
                    n_tok += len(t)
                    n_real = int(batch["attention_mask"][b].sum())
                    ids = e[:n_real]
                    self.entries[_key(ids, batch["labels"][b, :n_real])] = _Entry(
                        positions=(t + offset).cpu(), tokens=torch.cat([y[:, None], top], 1).cpu(),
                        tail_weight=mu.cpu(), tail_bias=(z_tail - (h0 * mu).sum(1)).cpu())
        model.train(was_training)
        self.mean_tail_mass = tail_mass / max(n_tok, 1)
        mb = sum(x.tail_weight.numel() * 4 + x.tokens.numel() * 8 for x in self.entries.values()) / 2**20
        logger.info("reduced lm_head: the label and θ₀'s top %d tokens per response position, the rest in one "
                    "linear tail logit (mean tail probability at θ₀ %.2g; %d positions, %.0f MB)", top_k,
                    self.mean_tail_mass, n_tok, mb)

    @staticmethod
    def _hidden(model, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """The lm_head's input at the last `keep` positions, `[B, keep, d]` (the decoder's normed output)."""
        inputs = model_inputs(batch, next(model.parameters()).device)
        return _decoder(model)(**inputs, use_cache=False).last_hidden_state[:, -keep:]

    def _full(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.weight.T
        return logits + self.bias if self.bias is not None else logits

    def _check(self, model, batch, keep: int, logits: torch.Tensor, precision: str) -> None:
        """The model's own logits must be `W h + b` of the decoder's output (no soft-capping or scaling)."""
        with autocast(precision, self.weight.device):
            own = forward_logits(model, batch, keep_last=keep).float()
        scale = float(own.abs().max()) + 1e-6
        if not torch.allclose(own, logits, rtol=0.0, atol=2e-2 * scale):
            raise _Unsupported("the model's logits are not its lm_head applied to the decoder's output")

    def __call__(self, model, batch: dict[str, torch.Tensor], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._hidden(model, batch, keep)
        n_rows, width = batch["input_ids"].shape
        offset = width - keep
        b_idx, t_idx, tokens, mu, bias = [], [], [], [], []
        for b in range(n_rows):
            n_real = int(batch["attention_mask"][b].sum())
            entry = self.entries.get(_key(batch["input_ids"][b, :n_real], batch["labels"][b, :n_real]))
            if entry is None:
                if bool((batch["labels"][b] != IGNORE_INDEX).any()):
                    raise KeyError("reduced lm_head: an example it was not built for")
                continue
            b_idx.append(torch.full((len(entry.positions),), b, dtype=torch.int64))
            t_idx.append(entry.positions - offset)
            tokens.append(entry.tokens)
            mu.append(entry.tail_weight)
            bias.append(entry.tail_bias)
        device = hidden.device
        out = torch.zeros(n_rows, keep, 2 + self.top_k, dtype=torch.float32, device=device)
        labels = torch.full((n_rows, keep), IGNORE_INDEX, dtype=torch.int64, device=device)
        if not b_idx:
            return out, labels
        b_idx, t_idx = torch.cat(b_idx).to(device), torch.cat(t_idx).to(device)
        tokens, mu, bias = torch.cat(tokens).to(device), torch.cat(mu).to(device), torch.cat(bias).to(device)
        with torch.autocast(device.type, enabled=False):  # the logits in float32, as the full head's signals
            h = hidden[b_idx, t_idx].float()  # [M, d]
            z = torch.einsum("md,mcd->mc", h, self.weight[tokens])  # [M, 1 + top_k]
            if self.bias is not None:
                z = z + self.bias[tokens]
            tail = (h * mu).sum(-1) + bias  # [M]
        width_z = z.shape[1]
        out[b_idx, t_idx, :width_z] = z
        out[b_idx, t_idx, -1] = tail
        if width_z < 1 + self.top_k:  # a vocabulary smaller than top_k + 1: the unused columns never win
            out[b_idx, t_idx, width_z:-1] = float("-inf")
        labels[b_idx, t_idx + 1] = 0
        return out, labels


class _Unsupported(Exception):
    pass


def reduced_head(model, examples: list[Example], pad_id: int, *, top_k: int, batch_size: int = 32,
                 precision: str = "fp32", reference=contextlib.nullcontext) -> ReducedHead | None:
    """A `ReducedHead` over `examples` at θ₀ (`reference()`: the context in which `model` computes θ₀), or None
    where it cannot stand in for the model's own head (top_k 0, an lm_head that trains or is wrapped, a vocabulary
    no larger than top_k + 1, logits that are not `W h + b`, or an unknown decoder stack)."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    why = None
    if top_k <= 0:
        return None
    if type(lm_head) is not torch.nn.Linear:  # None, a peft wrapper or a quantised layer
        why = "its lm_head is not a plain linear layer"
    elif any(p.requires_grad for p in lm_head.parameters()):
        why = "its lm_head trains"
    elif lm_head.weight.shape[0] <= top_k + 1:
        why = f"its vocabulary ({lm_head.weight.shape[0]}) is no larger than top_k + 1"
    elif _decoder(model) is None:
        why = "its decoder stack is not recognised"
    if why is None:
        try:
            return ReducedHead(model, examples, pad_id, top_k=top_k, batch_size=batch_size, precision=precision,
                               reference=reference)
        except _Unsupported as exc:
            why = str(exc)
    logger.info("reduced lm_head not used (%s): rows use the full vocabulary", why)
    return None
