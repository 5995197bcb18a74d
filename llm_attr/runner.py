"""θ₀ plus a resettable adapter, trained by `training.train`: the fine-tune runner every retraining method shares.

Daunce's perturbations, further training, LDS retraining, the removal study and the local black-box backend all
start from one model θ₀ (the target merged, or its own adapter) and train an adapter on top of it many times; a
`PerturbationModel` resets that adapter to its start between runs instead of copying the model. LoRA layers and
their parameters are found through peft's own API (`LoraLayer`, `adapter_layer_names`, `ModulesToSaveWrapper`),
and a fresh adapter is initialised by peft's `reset_lora_parameters`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from .errors import ConfigError
from .models.lora import LoraArgs

logger = logging.getLogger(__name__)


def lora_layers(model: torch.nn.Module) -> list:
    """The peft `LoraLayer` modules of `model`, in module order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter of the model's peft adapter(s): each LoRA layer's `adapter_layer_names` parts (lora_A,
    lora_B, embedding and magnitude parts) and the fully trained copies of `modules_to_save`."""
    from peft.utils import ModulesToSaveWrapper

    params: dict[int, torch.nn.Parameter] = {}
    for module in lora_layers(model):
        for attr in module.adapter_layer_names:
            part = getattr(module, attr, None)
            if part is not None:
                params.update({id(p): p for p in part.parameters()})
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            params.update({id(p): p for p in module.modules_to_save.parameters()})
    return list(params.values())


def _last_layers(model: torch.nn.Module, n_layers: int | None) -> torch.nn.Module:
    """A module holding the last `n_layers` decoder layers of `model` that hold its LoRA adapter (all of `model`
    for None or an unknown decoder stack)."""
    from .models.prefix_cache import decoder_parts

    parts = decoder_parts(model)
    if n_layers is None or parts is None:
        return model
    adapted = [layer for layer in parts[1] if lora_layers(layer)]
    return torch.nn.ModuleList(adapted[max(0, len(adapted) - n_layers):])


def trainable_lora_layers(model: torch.nn.Module) -> list:
    """The peft `LoraLayer` modules of `model` whose LoRA weights train, in module order."""
    return [m for m in lora_layers(model) if any(p.requires_grad for p in m.lora_A.parameters())]


@contextlib.contextmanager
def swapped_weights(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give `params` the `values` (no copy of the model: LoRA-sized tensors swapped in place)."""
    saved = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = values[n]
        yield
    finally:
        for n, p in params.items():
            p.data = saved[n]


class PerturbationModel:
    """θ₀ plus a trainable adapter, reset to its start before each perturbation (no model copy per k).

    `adapter: new`: the target merged into plain weights plus a fresh LoRA (A re-drawn from the perturbation's seed,
    B = 0); θ₀ is the adapter disabled. `adapter: continue`: the target's own adapter, trainable, reset to its
    trained weights; θ₀ is those weights swapped in. In both, `lora.layers` limits the trainable part to the last
    N (adapted) decoder layers; for `continue` the target's adapter below them stays fixed, so the prefix cache
    applies.
    """

    def __init__(self, model, mode: Literal["new", "continue"], lora: LoraArgs):
        from .models.lora import attach_lora

        self.mode = mode
        if mode == "new":
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = attach_lora(model, lora)
        else:
            if not hasattr(model, "peft_config"):
                raise ConfigError("adapter: continue needs a model with its LoRA adapter (a fine-tuned run directory)")
            self.model = model
            for p in model.parameters():
                p.requires_grad_(False)
            for p in adapter_parameters(_last_layers(model, lora.layers)):
                p.requires_grad_(True)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ConfigError("the perturbation model has no trainable parameters")
        self.start = {n: p.detach().clone() for n, p in self.trainable.items()}

    def reset(self, init_seed: int) -> None:
        """Back to θ₀; with a new adapter, LoRA A re-drawn (kaiming-uniform, as peft) from `init_seed`."""
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.start[n])
            if self.mode == "new":  # peft's own initialisation, drawn from init_seed
                torch.manual_seed(init_seed)
                for module in lora_layers(self.model):
                    for adapter_name in module.lora_A:
                        module.reset_lora_parameters(adapter_name, init_lora_weights=True)
        torch.manual_seed(init_seed)  # dropout

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which the model computes θ₀'s outputs."""
        if self.mode == "new":
            return self.model.disable_adapter()
        return swapped_weights(self.trainable, self.start)

    def save(self, path: Path) -> None:
        """Save the adapter (peft format) to `path` atomically (temp folder + rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.model.save_pretrained(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def resolved_adapter(mode: str, model) -> Literal["new", "continue"]:
    """`adapter: auto`: `continue` where the target is a LoRA adapter on a base (a run directory, a peft adapter
    folder, a checkpoint holding one, a loaded peft model), `new` for a merged or fully fine-tuned model."""
    if mode != "auto":
        return mode
    if isinstance(model, (str, Path)):
        from .models.loading import adapter_of

        return "continue" if adapter_of(model) is not None else "new"
    return "continue" if hasattr(getattr(model, "model", model), "peft_config") else "new"


def load_target(spec: str, mode: Literal["new", "continue"], device, dtype: str = "auto"):
    """(model, tokenizer) of a target for a perturbation mode: merged for `new`, base + trainable adapter for `continue`."""
    from .models.loading import adapter_of, base_model, detect_model, is_run_dir, load_model, load_tokenizer
    from .models.lora import load_adapter

    if mode == "new":
        loaded = load_model(spec, device=device, dtype=dtype)
        return loaded.model, loaded.tokenizer
    adapter = adapter_of(spec)
    if adapter is None:
        raise ConfigError(f"adapter: continue needs a model with a LoRA adapter (a peft adapter folder, a checkpoint "
                          f"holding one, or a fine-tuned run directory), got {spec}")
    logger.info("model: %s (its adapter trainable)", detect_model(spec).described)
    with base_model(None):
        base = load_model(adapter[0], device=device, dtype=dtype)
    model = load_adapter(base.model, str(adapter[1]), trainable=True)
    own = Path(spec) if is_run_dir(spec) else adapter[1]
    has_own = (own / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(own)) if has_own else base.tokenizer
    return model, tokenizer
