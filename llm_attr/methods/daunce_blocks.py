"""Block rows of a Daunce perturbation: the loss-matrix row under θ₀ plus one block of the adapter's change only.

A perturbation moves every adapted module at once, and its row is one K-th of a sample of the covariance
Cov_k(ℓ_q, ℓ_j) ≈ g_qᵀ Σ_θ g_j. Evaluating the row once per block b (a decoder layer, or a LoRA module) with only
that block's change applied gives B rows from the same training, and Σ_b Cov_k(ℓ_q^b, ℓ_j^b) estimates the
block-diagonal part of the same kernel, Σ_b g_q^bᵀ Σ_θ^bb g_j^b (the approximation K-FAC makes of the Hessian), from
K·B centred samples instead of K: the scores' sampling noise falls as if K were larger, for B cached forward passes
per perturbation and no extra training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from ..errors import ConfigError
from ..models.prefix_cache import decoder_parts
from ..runner import PerturbationModel, swapped_weights, trainable_lora_layers

RowBlocks = Literal["none", "layer", "module"]
ROW_BLOCKS = ("none", "layer", "module")


def adapter_blocks(pm: PerturbationModel, granularity: RowBlocks) -> list[list[str]]:
    """The trainable parameter names of `pm` grouped into blocks: one per decoder layer (`layer`) or per peft LoRA
    module (`module`); parameters outside them (e.g. `modules_to_save`) form one last block."""
    by_id = {id(p): n for n, p in pm.trainable.items()}
    if granularity == "module":
        groups = [list(m.parameters()) for m in trainable_lora_layers(pm.model)]
    elif granularity == "layer":
        parts = decoder_parts(pm.model)
        groups = [list(layer.parameters()) for layer in parts[1]] if parts else [list(pm.trainable.values())]
    else:
        raise ValueError(f"row_blocks must be one of {ROW_BLOCKS[1:]} here, got {granularity!r}")
    blocks = [names for names in ([by_id[id(p)] for p in g if id(p) in by_id] for g in groups) if names]
    seen = {n for b in blocks for n in b}
    rest = [n for n in pm.trainable if n not in seen]
    return blocks + ([rest] if rest else [])


@torch.no_grad()
def block_rows(pm: PerturbationModel, blocks: list[list[str]],
               evaluate: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`{key + "_blocks": [B, n]}`: `evaluate()`'s rows `{key: [n]}` under θ₀ plus each block's trained change alone
    (the other blocks at their start, where a new adapter's LoRA B is 0: no change)."""
    trained = {n: p.detach().clone() for n, p in pm.trainable.items()}
    rows = []
    for names in blocks:
        active = set(names)
        values = {n: trained[n] if n in active else pm.start[n] for n in pm.trainable}
        with swapped_weights(pm.trainable, values):
            rows.append(evaluate())
    return {f"{key}_blocks": torch.stack([r[key] for r in rows]) for key in rows[0]}


def stacked_block_rows(per_k: list[torch.Tensor]) -> torch.Tensor:
    """`[K·B, n]` float64 from K tensors `[B, n]`: each block centred over k, then stacked, so that a covariance
    (or correlation) over the first axis is the block-diagonal Σ_b Cov_k(x^b_q, x^b_j) (up to one scale)."""
    x = torch.stack(per_k).double()  # [K, B, n]
    x = x - x.mean(0, keepdim=True)
    return x.reshape(-1, x.shape[-1])


def uses_blocks(store, rows: str | None) -> bool:
    """Whether a scoring uses the block rows: `rows` full | blocks, or None: blocks when the run recorded them."""
    recorded = store.manifest["config"].get("row_blocks", "none") != "none"
    if rows not in (None, "full", "blocks"):
        raise ConfigError(f"rows must be 'full' or 'blocks', got {rows!r}")
    if rows == "blocks" and not recorded:
        raise ConfigError(f"{store.root}: the run recorded no block rows (row_blocks: none); score with --rows full "
                          "or re-run Daunce with --set row_blocks=layer")
    return recorded if rows is None else rows == "blocks"
