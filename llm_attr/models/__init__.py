"""Model loading (local, hub, GGUF, run directories, builtin), LoRA adapters and quantisation."""

from .loading import LoadedModel, load_model
from .lora import LoraArgs, attach_lora

__all__ = ["LoadedModel", "LoraArgs", "attach_lora", "load_model"]
