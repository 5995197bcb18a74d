"""Daunce's first-order objective: γ·(ℓ_i(θ) − ℓ_i(θ₀)) − w_i⟨f_θ − f_θ₀, ∂ℓ_i/∂f|θ₀⟩ in logit space.

`Theta0` holds what the term needs from the target θ₀ (its losses, ⟨f₀, ∂ℓ/∂f⟩ and its softmax rows, cached as
the lm_head's inputs when it is frozen); `response_nll_and_dot` computes loss and term in one pass over the
response rows; `perturbation_objective` is the objective `training.train` minimises for one perturbation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from ..data.tokenize import IGNORE_INDEX, Example, token_lengths
from ..losses import forward_logits

logger = logging.getLogger(__name__)

#: fp32 elements of one chunk of logit rows in the first-order term (16 MiB): rows per chunk = this // vocab.
LOGIT_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------- the first-order term in logit space


def response_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Response positions of a batch: (b `[M]`, t `[M]`, target token `[M]`, 1/n_b `[M]`), rows in (b, t) order.

    Row (b, t) is the logit vector `logits[b, t]`, which predicts `labels[b, t + 1]`.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    n_resp = mask.sum(-1).clamp(min=1).float()
    return b_idx, t_idx, targets[b_idx, t_idx], 1.0 / n_resp[b_idx]


RowProbs = Callable[[slice], torch.Tensor]  # rows slice -> θ₀ softmax rows [c, V] float32


class _ResponseRows(torch.autograd.Function):
    """Per example `[B]`, over its response rows in chunks: nll_b = Σ coef·(logsumexp f − f_y) (mean NLL) and
    dot_b = Σ coef·⟨f, p₀ − e_y⟩. One pass over the rows forward, one backward (softmax recomputed from the saved
    log-sum-exp, p₀ re-read), one scatter into the logits' gradient."""

    @staticmethod
    def forward(ctx, logits, probs0: RowProbs | None, b_idx, t_idx, targets, coef, chunk: int):  # noqa: D102
        nll = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        dot = torch.zeros_like(nll)
        lse = torch.empty(b_idx.numel(), dtype=torch.float32, device=logits.device)
        for start in range(0, b_idx.numel(), chunk):
            sl = slice(start, start + chunk)
            f = logits[b_idx[sl], t_idx[sl]].float()
            f_y = f.gather(1, targets[sl, None]).squeeze(1)
            lse[sl] = torch.logsumexp(f, dim=-1)
            nll.index_add_(0, b_idx[sl], coef[sl] * (lse[sl] - f_y))
            if probs0 is not None:
                dot.index_add_(0, b_idx[sl], coef[sl] * ((f * probs0(sl)).sum(-1) - f_y))
        ctx.save_for_backward(logits, b_idx, t_idx, targets, coef, lse)
        ctx.probs0, ctx.chunk = probs0, chunk
        return nll, dot

    @staticmethod
    def backward(ctx, grad_nll, grad_dot):  # noqa: D102
        logits, b_idx, t_idx, targets, coef, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, b_idx.numel(), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            b = b_idx[sl]
            g_n, g_d = grad_nll[b][:, None], grad_dot[b][:, None]
            g = torch.exp(logits[b, t_idx[sl]].float() - lse[sl, None]).mul_(g_n)  # ∂nll/∂f = softmax − e_y
            if ctx.probs0 is not None:
                g.addcmul_(ctx.probs0(sl), g_d)  # ∂dot/∂f = p₀ − e_y
                g_n = g_n + g_d
            g[torch.arange(g.shape[0], device=g.device), targets[sl]] -= g_n.squeeze(1)
            grad[b, t_idx[sl]] = g.mul_(coef[sl, None]).to(logits.dtype)
        return grad, None, None, None, None, None, None


def response_nll_and_dot(logits: torch.Tensor, probs0: RowProbs | None, rows: tuple,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ_b `[B]`, ⟨f_b, ∂ℓ_b/∂f|θ₀⟩ `[B]`) float32 from one pass over the response rows, differentiable.

    ℓ_b is the mean NLL over response tokens (`losses.per_example_loss`, to float32 round-off);
    ⟨f, ∂ℓ_b/∂f|θ₀⟩ = Σ_t (1/n_b)⟨f_bt, p₀_bt − e_{y_bt}⟩ (0 when `probs0` is None). logits: `[B, T, V]`;
    probs0(rows slice) -> θ₀ softmax rows `[c, V]` float32; rows from `response_rows`. Memory beyond the logits
    and their gradient: one chunk of `chunk` rows (default 16 MiB fp32).
    """
    chunk = chunk or max(1, LOGIT_CHUNK_ELEMENTS // logits.shape[-1])
    b_idx, t_idx, targets, coef = rows
    return _ResponseRows.apply(logits, probs0, b_idx, t_idx, targets, coef, chunk)


class Theta0:
    """What the first-order term needs from θ₀ for each training example: ℓ_i(θ₀), ⟨f₀, ∂ℓ_i/∂f|θ₀⟩ and the softmax
    of f₀ at its response positions.

    Cached for the whole training set (one pass, shared by all K perturbations) when the softmax rows fit in
    `cache_mb`; otherwise recomputed each step from a no-grad forward pass under `reference()` (the perturbation
    adapter disabled, or the target adapter's initial weights swapped in): never a second model.
    """

    def __init__(self, model, examples: list[Example], pad_id: int,
                 reference: Callable[[], contextlib.AbstractContextManager], cache_mb: float, batch_size: int):
        self.model, self.examples, self.pad_id, self.reference = model, examples, pad_id, reference
        n_rows = [sum(1 for y in e.labels[1:] if y != IGNORE_INDEX) for e in examples]
        head = model.get_output_embeddings()
        vocab, hidden = head.weight.shape
        self.offsets = torch.tensor([0, *np.cumsum(n_rows).tolist()], dtype=torch.long)
        # θ₀'s lm_head inputs ([M, D]) instead of its softmax rows ([M, V]) when the lm_head is frozen: the rows
        # are recomputed exactly from them, at V/D times less memory (85x for SmolLM2)
        self.head = None if any(p.requires_grad for p in head.parameters()) else head
        if self.head is not None and not self._head_gives_softmax():
            logger.info("θ₀'s softmax is not the lm_head of its input here (e.g. logits are scaled): keeping softmax rows")
            self.head = None
        width = hidden if self.head is not None else vocab
        size_mb = 4 * int(self.offsets[-1]) * width / 2**20
        self.cached = size_mb <= cache_mb
        what = "lm_head inputs" if self.head is not None else "softmax"
        if self.cached:
            logger.info("caching θ₀'s %s over %d response tokens (%.0f MiB)", what, int(self.offsets[-1]), size_mb)
            self._build_cache(batch_size)
        else:
            logger.info("θ₀'s %s rows need %.0f MiB > theta0_cache_mb=%g: recomputing them each step",
                        what, size_mb, cache_mb)

    @torch.no_grad()
    def _build_cache(self, batch_size: int) -> None:
        from ..data.tokenize import collate

        device = next(self.model.parameters()).device
        vocab, hidden = self.model.get_output_embeddings().weight.shape
        n = len(self.examples)
        width = hidden if self.head is not None else vocab
        self.rows = torch.empty(int(self.offsets[-1]), width, dtype=torch.float32, device=device)
        self.loss0 = torch.empty(n, dtype=torch.float32, device=device)
        self.const0 = torch.empty(n, dtype=torch.float32, device=device)
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(n), key=token_lengths(self.examples).__getitem__)
        captured: list[torch.Tensor] = []
        hook = self.model.get_output_embeddings().register_forward_hook(
            lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                batch = collate([self.examples[i] for i in idx], self.pad_id)
                captured.clear()
                with self.reference():
                    logits0 = forward_logits(self.model, batch)
                labels = batch["labels"].to(device)
                rows = tuple(r.to(device) for r in response_rows(labels))
                probs = torch.softmax(logits0[rows[0], rows[1]].float(), dim=-1)
                index = torch.tensor(idx, device=device)
                self.loss0[index], self.const0[index] = response_nll_and_dot(logits0, lambda sl, p=probs: p[sl], rows)
                dest = self.rows_of(torch.tensor(idx)).to(device)
                if self.head is not None:
                    self.rows[dest] = captured[-1][rows[0], rows[1]].float()
                else:
                    self.rows[dest] = probs
        finally:
            hook.remove()
        self.model.train(was_training)

    @torch.no_grad()
    def _head_gives_softmax(self) -> bool:
        """Whether softmax(lm_head(its input)) is θ₀'s softmax (no logit scaling or soft-capping after the head),
        checked on a few examples."""
        from ..data.tokenize import collate

        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        was_training = self.model.training
        self.model.eval()
        try:
            batch = collate(list(self.examples[:4]), self.pad_id)
            with self.reference():
                logits0 = forward_logits(self.model, batch)
        finally:
            hook.remove()
            self.model.train(was_training)
        rows = response_rows(batch["labels"].to(logits0.device))
        probs = torch.softmax(logits0[rows[0], rows[1]].float(), dim=-1)
        return torch.allclose(self._softmax(captured[-1][rows[0], rows[1]].float()), probs, atol=1e-5)

    def _softmax(self, h: torch.Tensor) -> torch.Tensor:
        """θ₀'s softmax rows `[c, V]` float32 from its lm_head inputs `[c, D]`."""
        head = self.head
        return torch.softmax(torch.nn.functional.linear(h, head.weight.float(),
                                                        None if head.bias is None else head.bias.float()), dim=-1)

    def rows_of(self, index: torch.Tensor) -> torch.Tensor:
        """Cache rows `[M]` of the examples at `index` `[B]` (their response tokens in order, example by example)."""
        starts, lens = self.offsets[index], self.offsets[index + 1] - self.offsets[index]
        shift = torch.repeat_interleave(starts - (lens.cumsum(0) - lens), lens)
        return shift + torch.arange(int(lens.sum()))

    def for_batch(self, batch: dict, labels: torch.Tensor, rows: tuple) -> tuple[torch.Tensor, torch.Tensor, RowProbs]:
        """(ℓ(θ₀) `[B]`, ⟨f₀, ∂ℓ/∂f|θ₀⟩ `[B]`, softmax-rows reader) for one training batch."""
        index = batch["index"].to(labels.device)
        if self.cached:
            dest = self.rows_of(index.cpu()).to(labels.device)
            if self.head is not None:  # the batch's rows once (read by the objective's forward and backward)
                probs = self._softmax(self.rows[dest])
                return self.loss0[index], self.const0[index], lambda sl: probs[sl]
            return self.loss0[index], self.const0[index], lambda sl: self.rows[dest[sl]]
        was_training = self.model.training
        self.model.eval()  # θ₀'s outputs are deterministic (no dropout), as in the cache
        with torch.no_grad(), self.reference():
            logits0 = forward_logits(self.model, batch, keep_last=labels.shape[1])  # the batch's response window
        self.model.train(was_training)

        def probs0(sl: slice) -> torch.Tensor:
            return torch.softmax(logits0[rows[0][sl], rows[1][sl]].float(), dim=-1)

        with torch.no_grad():
            loss0, const0 = response_nll_and_dot(logits0, probs0, rows)
        return loss0, const0, probs0


def reweighting(xi: torch.Tensor, rho: float) -> torch.Tensor:
    """The objective's example weights w_i = 1 + ρ(2ξ_i − 1) `[N]` from a perturbation's ξ ~ U(0, 1) `[N]`."""
    return 1.0 + rho * (2.0 * xi - 1.0)


def perturbation_objective(theta0: Theta0, weights: torch.Tensor, gamma: float):
    """Objective `(model, batch, logits) -> [B]`: γ·(ℓ_i(θ) − ℓ_i(θ₀)) − w_i⟨f_θ − f_θ₀, ∂ℓ_i/∂f|θ₀⟩ (0 at θ₀)."""

    def objective(model, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        labels = batch["labels"].to(logits.device)
        rows = tuple(r.to(logits.device) for r in response_rows(labels))
        loss0, const0, probs0 = theta0.for_batch(batch, labels, rows)
        loss, linear = response_nll_and_dot(logits, probs0, rows)  # one pass over the response rows
        w = weights[batch["index"].to(logits.device)]
        return gamma * (loss - loss0) - w * (linear - const0)

    return objective
