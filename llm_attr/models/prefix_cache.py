"""Frozen-prefix cache: when only the top decoder layers train, compute the bottom layers once per example.

A perturbation adapter on the last L of a model's N decoder layers leaves the embeddings and layers 0..N-L-1 as
they are, so the hidden state entering layer N-L is a fixed function of an example's tokens: the same under the
target θ₀ and under every perturbed θ_k, in every epoch. `prefix_cache(model, examples, pad_id)` computes those
states once and, while active, every forward pass whose rows are all cached starts at layer N-L from them
(transformers' `inputs_embeds` path with the bottom layers left out); any other batch runs the whole model.
What is computed is unchanged (checked on the first batch against the full forward); what is saved is the bottom
layers' forward and nothing of their backward (none is needed: they hold no trainable parameter).

Rows are looked up by content (token ids and position ids of their real tokens), so training, evaluation, θ₀'s
outputs and gradient extraction all hit the cache without knowing of it, whatever the padding or batch order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..data.tokenize import Example, collate, token_lengths

logger = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the capture hook: the hidden state entering the first cached-from layer has been read."""


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """(the decoder stack module, its `layers`) of a transformers causal LM, peft-wrapped or not; None if unknown."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None) or getattr(base, "transformer", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(layers, nn.ModuleList) or not hasattr(decoder, "embed_tokens"):
        return None
    return decoder, layers


def first_trainable_layer(model: nn.Module) -> int:
    """Index of the lowest decoder layer holding a trainable parameter (0 when the embeddings train, or unknown)."""
    parts = decoder_parts(model)
    if parts is None:
        return 0
    decoder, layers = parts
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(layers)


def _row_key(ids: torch.Tensor, positions: torch.Tensor) -> bytes:
    """Content key of one row's real tokens: `ids [n]`, `positions [n]` int64."""
    return hashlib.blake2b(ids.numpy().tobytes() + positions.numpy().tobytes(), digest_size=16).digest()


def _has_dropout(modules: Sequence[nn.Module], config) -> bool:
    if any(float(getattr(config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout")):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for mod in modules for m in mod.modules())


class PrefixCache:
    """Hidden states entering decoder layer `start` for a set of examples: `{row key: [n_tokens, D]}`.

    Memory: `Σ n_tokens · D · 4` bytes (float32; fp32 residual stream, also under bf16 autocast).
    """

    def __init__(self, model: nn.Module, start: int):
        parts = decoder_parts(model)
        if parts is None:
            raise ValueError("prefix cache: not a transformers decoder (no model.layers / embed_tokens)")
        self.model, self.start = model, start
        self.decoder, self.layers = parts
        self.states: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states.values())

    def missing(self, examples: Sequence[Example]) -> list[Example]:
        """The examples of `examples` whose states are not cached yet."""
        return [e for e in examples
                if _row_key(torch.tensor(e.input_ids, dtype=torch.long), torch.arange(e.n_tokens)) not in self.states]

    @torch.no_grad()
    def add(self, examples: Sequence[Example], pad_id: int, batch_size: int = 32, autocast=None) -> None:
        """Compute and keep the states of `examples` (length-sorted batches; the model's forward up to `start`)."""
        if not examples:
            return
        device = next(self.model.parameters()).device
        captured: list[torch.Tensor] = []

        def capture(_module, args, kwargs):
            captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            raise _Captured

        order = sorted(range(len(examples)), key=token_lengths(examples).__getitem__)
        handle = self.layers[self.start].register_forward_pre_hook(capture, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(order), batch_size):
                batch = collate([examples[j] for j in order[i : i + batch_size]], pad_id)
                captured.clear()
                with autocast() if autocast is not None else contextlib.nullcontext():
                    try:
                        self.decoder(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device),
                                     position_ids=batch["position_ids"].to(device), use_cache=False)
                    except _Captured:
                        pass
                hidden = captured[0].detach().float().cpu()
                for b in range(hidden.shape[0]):
                    real = batch["attention_mask"][b].bool()
                    key = _row_key(batch["input_ids"][b][real], batch["position_ids"][b][real])
                    self.states[key] = hidden[b][real].clone()
        finally:
            handle.remove()
            self.model.train(was_training)

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """`[B, T, D]` cached states for the batch (zeros at padding), or None when any row is not cached."""
        ids = input_ids.cpu()
        if attention_mask is not None and attention_mask.shape != ids.shape:
            self.misses += 1  # a generation step over a KV cache: not a whole example
            return None
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if position_ids is None else position_ids.cpu()
        rows = []
        for b in range(ids.shape[0]):
            state = self.states.get(_row_key(ids[b][mask[b]], pos[b][mask[b]]))
            if state is None:
                self.misses += 1
                return None
            rows.append(state)
        self.hits += 1
        out = torch.zeros(ids.shape[0], ids.shape[1], rows[0].shape[-1], dtype=rows[0].dtype)
        for b, state in enumerate(rows):
            out[b][mask[b]] = state
        return out.to(input_ids.device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While active, a decoder call whose rows are all cached runs layers `start..` from the cached states."""
        decoder, full_layers, start = self.decoder, self.layers, self.start
        top = nn.ModuleList(list(full_layers)[start:])
        swapped = []

        def before(_module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            past = kwargs.get("past_key_values")
            if input_ids is None or kwargs.get("inputs_embeds") is not None or (
                    past is not None and past.get_seq_length() > 0):
                return None  # embeddings given, or a generation step continuing from a KV cache
            states = self.lookup(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
            if states is None:
                return None
            dtype = decoder.embed_tokens.weight.dtype
            kwargs = {**kwargs, "input_ids": None, "inputs_embeds": states.to(dtype)}
            decoder.layers = top
            swapped.append(True)
            return (), kwargs

        def after(_module, _args, _kwargs, output):
            if swapped:
                decoder.layers = full_layers
                swapped.clear()
            return output

        h1 = decoder.register_forward_pre_hook(before, with_kwargs=True)
        h2 = decoder.register_forward_hook(after, with_kwargs=True, always_call=True)
        try:
            yield
        finally:
            h1.remove()
            h2.remove()
            decoder.layers = full_layers


def _agrees(model: nn.Module, start: int, examples: Sequence[Example], pad_id: int) -> bool:
    """True when the cached forward gives the full forward's logits (fp32, rtol 1e-4) on a few `examples`.

    Checked in fp32 with a cache of its own: under bf16 autocast two batchings of the full model already differ by
    bf16 rounding, which says nothing of whether the cached path computes the same function.
    """
    probe = list(examples[:4])
    check = PrefixCache(model, start)
    check.add(probe, pad_id, batch_size=2)
    batch = collate(probe, pad_id)
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(**inputs, use_cache=False).logits.float()
            with check.active():
                cached = model(**inputs, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    real = batch["attention_mask"].bool()
    err = (full - cached)[real].abs().max().item()
    scale = full[real].abs().max().item()
    return check.hits > 0 and err <= 1e-4 * max(scale, 1.0)


def open_prefix_cache(model: nn.Module, examples: Sequence[Example], pad_id: int, *, batch_size: int = 32,
                      max_mb: float = 2048.0, autocast=None) -> PrefixCache | None:
    """A cache of the frozen bottom of `model` holding `examples`' states, or None where it would be off.

    Off when every layer trains, the model is not a known decoder, the bottom part has dropout, the states would
    exceed `max_mb`, or the cached forward does not reproduce the full one. `autocast`: a context-manager factory
    (the precision training runs in), so the states match it. Use it with `cache.active()`.
    """
    start = first_trainable_layer(model)
    parts = decoder_parts(model)
    if start == 0 or parts is None or not examples:
        return None
    decoder, layers = parts
    if _has_dropout([decoder.embed_tokens, *list(layers)[:start]], getattr(model, "config", None)):
        logger.info("prefix cache off: the frozen layers have dropout")
        return None
    mb = state_mb(model, examples)
    if mb > max_mb:
        logger.info("prefix cache off: %.0f MB of states exceed the %.0f MB limit", mb, max_mb)
        return None
    if not _agrees(model, start, examples, pad_id):
        logger.warning("prefix cache off: the cached forward of %s differs from the full one",
                       type(model).__name__)
        return None
    cache = PrefixCache(model, start)
    cache.add(examples, pad_id, batch_size=batch_size, autocast=autocast)
    logger.info("prefix cache: layers 0-%d of %d computed once for %d examples (%.0f MB); training and "
                "evaluation start at layer %d", start - 1, len(layers), len(examples), cache.nbytes() / 2**20, start)
    return cache


def state_mb(model: nn.Module, examples: Sequence[Example]) -> float:
    """MB of float32 states that `examples` take in a cache of `model` (Σ n_tokens · hidden size · 4 bytes)."""
    parts = decoder_parts(model)
    hidden = int(getattr(model.config, "hidden_size", 0) or (parts[0].embed_tokens.weight.shape[1] if parts else 0))
    return sum(token_lengths(examples)) * hidden * 4 / 2**20


@contextlib.contextmanager
def prefix_cache(model: nn.Module, examples: Sequence[Example], pad_id: int, *, batch_size: int = 32,
                 max_mb: float = 2048.0, autocast=None) -> Iterator[PrefixCache | None]:
    """Cache the frozen bottom of `model` for `examples` while the block runs; yields the cache or None when off
    (`open_prefix_cache` says when)."""
    cache = open_prefix_cache(model, examples, pad_id, batch_size=batch_size, max_mb=max_mb, autocast=autocast)
    if cache is None:
        yield None
        return
    with cache.active():
        yield cache
