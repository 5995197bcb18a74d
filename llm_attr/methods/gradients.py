"""Per-example gradients of linear layers by hooks, optionally LoGra-projected, for the gradient attribution family.

For a linear layer y_t = W x_t (+ b) the gradient of one example's loss is G = Σ_t δ_t x_tᵀ (`[out, in]`, δ_t the
gradient at the output, x_t the input at token t). Forward hooks capture x, one backward of the *sum* of the
per-example losses gives every example its own δ (examples never interact), and the per-example G is an einsum over
tokens. With projections P_in `[r_in, in]` and P_out `[r_out, out]` the projected gradient P_out G P_inᵀ =
Σ_t (P_out δ_t)(P_in x_t)ᵀ is built from projected x and δ, never forming G (LoGra).

Peft LoRA adapters are covered by the same path: `lora_A` and `lora_B` are plain `nn.Linear` modules, so hooking
them gives G_A = Σ_t (s·Bᵀδ_t) x_tᵀ and G_B = Σ_t (s·δ_t)(A x_t)ᵀ, the LoRA scaling s included by autograd.
GPT-2 `Conv1D` layers (weight stored `[in, out]`) are handled too; their gradient is reported as `[out, in]`,
the transpose of `weight.grad`. Biases are not tracked.

Padding never changes an example's gradient: position ids count real tokens only, padded positions get zero δ,
and x and δ are zeroed there explicitly. The model runs in eval mode (dropout off, gradient checkpointing off).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import LlmAttrError
from ..losses import model_inputs, per_example_loss

logger = logging.getLogger(__name__)

Projection = Literal["gaussian", "pca"]


class GradientError(LlmAttrError):
    """The model or the parameter selection cannot give per-example gradients."""


@dataclass(frozen=True)
class LayerBlock:
    """Where one layer's (projected) gradient `[out_dim, in_dim]` (row-major) sits in the flat vector `[d]`."""

    name: str
    start: int
    stop: int
    out_dim: int
    in_dim: int


@dataclass
class TrackedLayer:
    """A linear layer whose gradient is taken. `p_in [r_in, in]` / `p_out [r_out, out]` are None when unprojected."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    transposed: bool  # GPT-2 Conv1D: weight stored [in, out]
    p_in: torch.Tensor | None = None
    p_out: torch.Tensor | None = None

    @property
    def in_dim(self) -> int:
        return self.in_features if self.p_in is None else self.p_in.shape[0]

    @property
    def out_dim(self) -> int:
        return self.out_features if self.p_out is None else self.p_out.shape[0]


@dataclass
class KroneckerFactors:
    """Running K-FAC statistics per layer, in the projected (or exact) space of each layer.

    `activation[name]`: Σ x̃ x̃ᵀ over real tokens `[in_dim, in_dim]` float64; `gradient[name]`: Σ δ̃ δ̃ᵀ over
    tokens `[out_dim, out_dim]` float64. A = activation / n_tokens, S = gradient / n_examples, so A ⊗ S
    approximates the per-example Fisher (1/N) Σ_i vec(G_i) vec(G_i)ᵀ with tokens taken as independent.
    """

    activation: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0
    n_examples: int = 0
    _first_layer: str | None = field(default=None, repr=False)

    def add(self, name: str, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add one layer call's x̃ `[B, T, in_dim]` and δ̃ `[B, T, out_dim]` over real tokens (`mask [B, T]`).

        Token counts are taken from the first layer; `n_examples` is the caller's to update.
        """
        xs = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        ds = delta[mask] if mask is not None else delta.reshape(-1, delta.shape[-1])
        for sums, v in ((self.activation, xs), (self.gradient, ds)):
            cov = (v.T @ v).double()  # float32 product, float64 running sum
            sums[name] = sums[name] + cov if name in sums else cov
        if name == self._first_layer or self._first_layer is None:
            self._first_layer = name
            self.n_tokens += xs.shape[0]

    def covariances(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A `[in_dim, in_dim]`, S `[out_dim, out_dim]`) float64 of layer `name`."""
        if self.n_examples == 0:
            raise GradientError("K-FAC factors are empty: run the extractor over the training set first")
        return self.activation[name] / self.n_tokens, self.gradient[name] / self.n_examples

    def merge(self, other: KroneckerFactors) -> KroneckerFactors:
        """Add another process's or shard's statistics (in place); returns self."""
        for mine, theirs in ((self.activation, other.activation), (self.gradient, other.gradient)):
            for k, v in theirs.items():
                mine[k] = mine[k] + v if k in mine else v.clone()
        self.n_tokens += other.n_tokens
        self.n_examples += other.n_examples
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"activation.{k}": v for k, v in self.activation.items()}
        out.update({f"gradient.{k}": v for k, v in self.gradient.items()})
        out["n_tokens"] = torch.tensor(self.n_tokens)
        out["n_examples"] = torch.tensor(self.n_examples)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> KroneckerFactors:
        out = cls(n_tokens=int(state["n_tokens"]), n_examples=int(state["n_examples"]))
        for k, v in state.items():
            kind, _, name = k.partition(".")
            if kind == "activation":
                out.activation[name] = v
            elif kind == "gradient":
                out.gradient[name] = v
        return out


def _linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, transposed) of an nn.Linear or GPT-2 Conv1D, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.weight.shape[1], True
    return None


_LORA_NAME = re.compile(r"lora_[AB]\.([^.]+)$")


def select_layers(model: nn.Module, params: str = "lora") -> list[tuple[str, nn.Module, int, int, bool]]:
    """Linear layers to track, in module order: (name, module, in, out, transposed).

    `params="lora"`: the `lora_A` / `lora_B` modules of the model's active peft adapter(s). `"adapted"`: the linear
    weights LoRA would adapt (`effective_params`: what "lora" means for a merged model). Otherwise a regular
    expression searched in module names (`"mlp"`, `r"layers\\.1\\..*proj$"`); `nn.Linear` and GPT-2 `Conv1D` only.
    """
    if params == "adapted":
        return _adapted_layers(model)
    pattern = None if params == "lora" else re.compile(params)
    active = None
    if pattern is None and hasattr(model, "peft_config"):
        active = model.active_adapters  # a property on PeftModel, a method on transformers' peft integration
        active = set(active() if callable(active) else active)
    found = []
    for name, module in model.named_modules():
        dims = _linear_dims(module)
        if dims is None:
            continue
        if pattern is None:
            m = _LORA_NAME.search(name)
            if m is None or (active is not None and m.group(1) not in active):
                continue
            owner = model.get_submodule(name.rsplit(".", 2)[0])
            if m.group(1) in getattr(owner, "lora_variant", {}):  # DoRA uses the weights outside these calls
                raise GradientError(f"{name}: LoRA variants (DoRA, ...) are not supported; use plain LoRA")
        elif not pattern.search(name):
            continue
        found.append((name, module, *dims))
    if not found:
        if pattern is None:
            raise GradientError(
                "params='lora': the model has no active LoRA adapter (give a fine-tuned run directory, attach or load an "
                "adapter, or set params to a module-name pattern)"
            )
        raise GradientError(f"params={params!r}: no nn.Linear / Conv1D module name matches this pattern")
    return found


def effective_params(params: str, model: nn.Module, spec: object = None) -> str:
    """`params` for `select_layers`: `"lora"` on a model without a LoRA adapter that is not a builtin base (a merged
    or fully fine-tuned model: a user's fine-tune) means `"adapted"`, the linear weights LoRA would adapt."""
    builtin = isinstance(spec, str) and spec.startswith("builtin:")
    if params == "lora" and not hasattr(model, "peft_config") and not builtin:
        return "adapted"
    return params


def _adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module, int, int, bool]]:
    """`params='adapted'` (what `'lora'` means on a merged or fully fine-tuned model): the linear weights of the layers
    LoRA would adapt (`models.lora.default_target_modules`: attention and MLP projections; all linear layers but
    the output head for other architectures), named in the log."""
    from ..models.lora import default_target_modules

    config = getattr(model, "config", None)
    targets = default_target_modules(getattr(config, "model_type", ""))
    head = getattr(model, "get_output_embeddings", lambda: None)()
    found = []
    for name, module in model.named_modules():
        dims = _linear_dims(module)
        if dims is None or module is head:
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            found.append((name, module, *dims))
    if not found:
        raise GradientError("params='lora': the model has no LoRA adapter and no linear layer LoRA would adapt; set "
                            "params to a module-name pattern")
    kinds = sorted({name.rsplit(".", 1)[-1] for name, *_ in found})
    logger.info("params='lora' on a model without a LoRA adapter (merged or fully fine-tuned): gradients of the %d "
                "linear weights LoRA would adapt (%s), e.g. %s", len(found), ", ".join(kinds), found[0][0])
    return found


def _seed_for(seed: int, name: str, side: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}:{side}".encode())) % (2**63)


def gaussian_projection(rank: int, dim: int, seed: int) -> torch.Tensor:
    """`[rank, dim]` float32 with i.i.d. N(0, 1/rank) entries, so E[PᵀP] = I (inner products unbiased)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, dim, generator=gen) / rank**0.5


def pca_projection(covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """`[rank, dim]` float32: the top-`rank` eigenvectors (rows) of a covariance `[dim, dim]`."""
    _, vecs = torch.linalg.eigh(covariance.double())
    return vecs[:, -rank:].flip(-1).T.contiguous().float()


class GradientExtractor:
    """Per-example gradients of the tracked linear layers, exact or LoGra-projected.

    `params`: `"lora"` (the active adapter's lora_A / lora_B) or a module-name regex. `projection_rank`: rank per
    side (0: exact gradients; a side whose dimension is <= the rank stays unprojected). `projection`: `"gaussian"`
    (seeded per layer and side, ready at once) or `"pca"` (call `fit_projection` on training batches first).
    """

    def __init__(
        self,
        model: nn.Module,
        params: str = "lora",
        projection_rank: int = 64,
        projection: Projection = "gaussian",
        seed: int = 0,
    ) -> None:
        if projection_rank < 0:
            raise ValueError(f"projection_rank must be >= 0, got {projection_rank}")
        if projection not in ("gaussian", "pca"):
            raise ValueError(f"projection must be 'gaussian' or 'pca', got {projection!r}")
        self.model = model
        self.params = params
        self.projection_rank = projection_rank
        self.projection = projection
        self.seed = seed
        self.layers = [TrackedLayer(n, m, i, o, t) for n, m, i, o, t in select_layers(model, params)]
        self.projection_ready = projection_rank == 0 or projection == "gaussian"
        self.last_losses: torch.Tensor | None = None
        if projection_rank and projection == "gaussian":
            for layer in self.layers:
                layer.p_in = self._gaussian(layer.name, "in", layer.in_features)
                layer.p_out = self._gaussian(layer.name, "out", layer.out_features)

    # ------------------------------------------------------------------ layout

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layer_blocks(self) -> list[LayerBlock]:
        """Per-layer slices of the flat gradient `[d]`, in module order."""
        blocks, start = [], 0
        for layer in self.layers:
            size = layer.out_dim * layer.in_dim
            blocks.append(LayerBlock(layer.name, start, start + size, layer.out_dim, layer.in_dim))
            start += size
        return blocks

    @property
    def dim(self) -> int:
        """d: length of one example's (projected) gradient."""
        return sum(layer.out_dim * layer.in_dim for layer in self.layers)

    # ------------------------------------------------------------- projections

    def _gaussian(self, name: str, side: str, dim: int) -> torch.Tensor | None:
        if dim <= self.projection_rank:
            return None
        seed = _seed_for(self.seed, name, side)
        return gaussian_projection(self.projection_rank, dim, seed).to(self.device)

    def fit_projection(self, data: Iterable[dict[str, torch.Tensor]] | KroneckerFactors) -> GradientExtractor:
        """PCA projections: the top eigenvectors of each layer's input and output-gradient covariances.

        `data`: training batches, or the `KroneckerFactors` of `covariances(batches)` (e.g. merged over processes).
        """
        if self.projection != "pca" or self.projection_rank == 0:
            raise GradientError("fit_projection is for projection='pca' with projection_rank > 0")
        factors = data if isinstance(data, KroneckerFactors) else self.covariances(data)
        r = self.projection_rank
        for layer in self.layers:
            a, s = factors.covariances(layer.name)
            if a.shape[0] != layer.in_features or s.shape[0] != layer.out_features:
                raise GradientError(
                    f"fit_projection: the statistics of {layer.name} are not unprojected covariances"
                )
            layer.p_in = pca_projection(a, r).to(self.device) if layer.in_features > r else None
            layer.p_out = pca_projection(s, r).to(self.device) if layer.out_features > r else None
        self.projection_ready = True
        return self

    def covariances(self, batches: Iterable[dict[str, torch.Tensor]]) -> KroneckerFactors:
        """Unprojected input and output-gradient statistics of every layer over `batches` (for PCA projections)."""
        factors = KroneckerFactors()
        with torch.no_grad():
            for batch in batches:
                for layer, x, delta, mask in self._captured(batch, project=False):
                    factors.add(layer.name, x, delta, mask)
                factors.n_examples += batch["input_ids"].shape[0]
        if factors.n_examples == 0:
            raise GradientError("covariances: no batches")
        return factors

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The projection matrices (`p_in.<layer>`, `p_out.<layer>`), to save next to the gradients."""
        out = {}
        for layer in self.layers:
            if layer.p_in is not None:
                out[f"p_in.{layer.name}"] = layer.p_in.cpu()
            if layer.p_out is not None:
                out[f"p_out.{layer.name}"] = layer.p_out.cpu()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load projections saved by `state_dict` (same model, params and projection_rank)."""
        r = self.projection_rank
        for layer in self.layers:
            for side, dim in (("in", layer.in_features), ("out", layer.out_features)):
                p = state.get(f"p_{side}.{layer.name}")
                expected = (r, dim) if r and dim > r else None
                if (None if p is None else tuple(p.shape)) != expected:
                    raise GradientError(
                        f"projection state of {layer.name} ({side}) does not fit this extractor"
                    )
                setattr(layer, f"p_{side}", None if p is None else p.to(self.device, torch.float32))
        self.projection_ready = True

    # ---------------------------------------------------------------- capture

    @contextmanager
    def _hooks(self, records: dict[str, list], project: bool) -> Iterator[None]:
        """Forward hooks storing (x̃ `[B, T, in_dim]` float32, output) per call of each tracked layer."""
        handles = []

        def make_hook(layer: TrackedLayer):
            def hook(module, inputs, output):
                if not torch.is_grad_enabled():
                    return
                x = inputs[0].detach().float()
                if project and layer.p_in is not None:
                    x = x @ layer.p_in.T
                records[layer.name].append((x, output))

            return hook

        def input_requires_grad(module, inputs, output):
            # frozen models: make activations carry gradients even when no parameter requires grad
            if isinstance(output, torch.Tensor) and not output.requires_grad and output.is_floating_point():
                output.requires_grad_(True)

        try:
            embeddings = (
                self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            )
            if embeddings is not None:
                handles.append(embeddings.register_forward_hook(input_requires_grad))
            for layer in self.layers:
                handles.append(layer.module.register_forward_hook(make_hook(layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _captured(self, batch: dict[str, torch.Tensor], project: bool = False):
        """Forward + one backward of Σ losses; yields (layer, x̃, δ̃, mask) per layer call, zero at padding.

        x̃ `[B, T, in_dim]`, δ̃ `[B, T, out_dim]` float32 (projected when `project`); mask `[B, T]` bool or None when
        the layer's input is not laid out as `[B, T, ...]`.
        """
        records: dict[str, list] = {layer.name: [] for layer in self.layers}
        was_training = self.model.training
        self.model.eval()
        device = self.device
        try:
            with torch.enable_grad():
                with self._hooks(records, project):
                    logits = self.model(**model_inputs(batch, device), use_cache=False).logits
                losses = per_example_loss(logits, batch["labels"].to(logits.device))
                total = losses.sum()
            outputs = [out for layer in self.layers for _, out in records[layer.name]]
            missing = [layer.name for layer in self.layers if not records[layer.name]]
            if missing:
                raise GradientError(
                    f"tracked layers not called in the forward pass (merged or disabled adapter?): {missing[:3]}"
                )
            if not all(o.requires_grad for o in outputs):
                raise GradientError("a tracked layer's output does not require grad; cannot take gradients")
            deltas = torch.autograd.grad(total, outputs, allow_unused=True, materialize_grads=True)
        finally:
            self.model.train(was_training)
        self.last_losses = losses.detach().float()
        mask = batch["attention_mask"].to(device).bool()
        i = 0
        for layer in self.layers:
            for x, _ in records[layer.name]:
                delta = deltas[i].float()
                i += 1
                if project and layer.p_out is not None:
                    delta = delta @ layer.p_out.T
                m = mask if x.dim() == 3 and x.shape[:2] == mask.shape else None
                if m is not None:
                    keep = m.unsqueeze(-1)
                    x = torch.where(keep, x, 0.0)
                    delta = torch.where(keep, delta, 0.0)
                yield layer, x, delta, m

    # -------------------------------------------------------------- gradients

    def per_example(
        self, batch: dict[str, torch.Tensor], factors: KroneckerFactors | None = None
    ) -> torch.Tensor:
        """Per-example (projected) gradients of the per-example loss: `[B, d]` float32, blocks as in `layer_blocks`.

        `batch` comes from `collate` (input_ids, attention_mask, labels, position_ids). With `factors`, the K-FAC
        statistics of this batch are added to it in the same pass. `self.last_losses` holds the batch's `[B]` losses.
        """
        if not self.projection_ready:
            raise GradientError("projection='pca' needs fit_projection(train batches) before per_example")
        n_examples = batch["input_ids"].shape[0]
        grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for layer, x, delta, mask in self._captured(batch, project=True):
                if x.dim() == 2:  # [B, in]: no token axis
                    x, delta = x.unsqueeze(1), delta.unsqueeze(1)
                g = torch.einsum("bto,bti->boi", delta, x)
                grads[layer.name] = grads[layer.name] + g if layer.name in grads else g
                if factors is not None:
                    factors.add(layer.name, x, delta, mask)
        if factors is not None:
            factors.n_examples += n_examples
        return torch.cat([grads[layer.name].reshape(n_examples, -1) for layer in self.layers], dim=1)
