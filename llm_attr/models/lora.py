"""LoRA adapters through peft: a config dataclass, per-architecture default target modules, attach and load."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

# Per-architecture defaults: attention and MLP projections (the modules people fine-tune).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@dataclass
class LoraArgs:
    """LoRA adapter settings. `target_modules: null` picks the architecture's default (all linear layers otherwise)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] | None = field(default=None, metadata={"help": "module names to adapt; null: the architecture's default (all linear layers otherwise)"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head]"})
    layers: int | None = field(default=None, metadata={"help": (
        "adapt only the last N decoder layers (peft's layers_to_transform); null: every layer. Below them the "
        "model is frozen, so Daunce computes that part once per example (models.prefix_cache)")})

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"lora.layers must be >= 1 or null, got {self.layers}")
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def default_target_modules(model_type: str) -> list[str] | str:
    return DEFAULT_TARGET_MODULES.get(model_type, "all-linear")


def peft_config(args: LoraArgs, model_type: str, num_layers: int | None = None):
    """peft's `LoraConfig` for `args`; `num_layers` (the model's decoder layers) is needed with `args.layers`."""
    from peft import LoraConfig

    targets = args.target_modules or default_target_modules(model_type)
    layers = None
    if args.layers is not None:
        if not num_layers:
            raise ModelError(f"lora.layers: {args.layers} needs a model whose config names its number of layers")
        layers = list(range(max(0, num_layers - args.layers), num_layers))
    return LoraConfig(
        layers_to_transform=layers,
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        modules_to_save=args.modules_to_save,
        fan_in_fan_out=model_type == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, args: LoraArgs, adapter_name: str = "default"):
    """Wrap `model` in a `PeftModel` with a new, trainable LoRA adapter (B = 0: the model's outputs are unchanged)."""
    from peft import get_peft_model

    cfg = peft_config(args, model.config.model_type, getattr(model.config, "num_hidden_layers", None))
    try:
        return get_peft_model(model, cfg, adapter_name=adapter_name)
    except ValueError as e:
        raise ModelError(f"cannot attach LoRA to {model.config.model_type!r}: {e}") from None


def load_adapter(model, adapter_dir: str, trainable: bool = False):
    """Load a saved peft adapter onto `model` from `adapter_model.safetensors` (never a pickled `.bin`)."""
    from peft import PeftModel

    folder = Path(adapter_dir)
    if not (folder / "adapter_model.safetensors").is_file():
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise ModelError(f"{folder}: the adapter is a pickle (.bin/.pt), which can run code when loaded; "
                             "llm_attr loads adapters from adapter_model.safetensors only. Convert it with "
                             "safetensors if you trust its source")
        raise ModelError(f"{folder}: no adapter_model.safetensors (not a saved peft adapter)")
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except Exception as e:  # shape mismatch: adapter for another base, missing files...
        mismatches = re.findall(r"size mismatch for ([^:\s]+): copying a param with shape (torch.Size\(\[[^]]*\]\)) "
                                r"from checkpoint, the shape in current model is (torch.Size\(\[[^]]*\]\))", str(e))
        if mismatches:
            name, saved, current = mismatches[0]
            raise ModelError(f"{adapter_dir}: the adapter was trained on a base model of other shapes; "
                             f"{len(mismatches)} tensors differ, e.g. {name}: {saved} in the adapter, {current} "
                             "here. Load it onto the base it was trained on") from None
        raise ModelError(f"{adapter_dir}: cannot load adapter onto this base model ({type(e).__name__}: {e})") from None


def _merged_forward(layer, x, *args, **kwargs):
    """`x @ (W + Σ_a s_a·B_a·A_a)ᵀ + b`: the LoRA layer's function with one matmul; W itself is not modified."""
    import torch.nn.functional as F

    base = layer.get_base_layer()
    weight = base.weight
    for name in layer.active_adapters:
        if name in layer.lora_A:
            weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    if layer.fan_in_fan_out:  # GPT-2's Conv1D keeps its weight as [in, out]
        weight = weight.T
    return F.linear(x.to(weight.dtype), weight, base.bias)


def _mergeable(layer) -> bool:
    import torch

    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    return (not layer.merged and not layer.disable_adapters and not layer.lora_variant
            and isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and weight.dim() == 2
            and type(weight) is torch.nn.Parameter)


@contextlib.contextmanager
def merged_lora_forward(model) -> Iterator[None]:
    """For inference: every plain LoRA Linear computes `x (W + sBA)ᵀ`, the sum formed per call and dropped,
    instead of `x Wᵀ + s (x Aᵀ) Bᵀ`. The same function at the cost of one matmul: for a rank-r adapter that saves
    2r(in + out)/(in·out) of each layer's work per token (38% of builtin:tiny's forward at rank 64). Base weights
    are never modified (no merge/unmerge drift). Quantised bases and DoRA-style variants keep their own forward.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    patched = []
    for module in model.modules():
        if isinstance(module, LoraLinear) and _mergeable(module):
            module.forward = functools.partial(_merged_forward, module)  # shadows the class's forward
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
