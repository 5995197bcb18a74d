"""Load a causal LM and its tokenizer from a builtin name, a local directory, a GGUF file, a hub id or a run directory.

A run directory (written by `llm-attr finetune`) holds `manifest.json` naming its base model and an `adapter/`
folder: loading it loads the base (recursively: a run may build on a run) and merges or stacks the adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import ModelError
from ..io import contained_path
from .lora import load_adapter

logger = logging.getLogger(__name__)

Quantization = Literal["none", "4bit", "8bit"]

#: Files any one of which a local model directory needs for `AutoTokenizer` to load its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_remote_code = contextvars.ContextVar("llm_attr_trust_remote_code", default=False)


@contextlib.contextmanager
def remote_code_trusted(trust: bool = True) -> Iterator[None]:
    """Within the block, every model and tokenizer load may run code from the model directory (`auto_map`).

    What `--trust-remote-code` does for every command; off by default. `load_model(trust_remote_code=True)` does
    it for one load.
    """
    token = _remote_code.set(trust)
    try:
        yield
    finally:
        _remote_code.reset(token)


def _trusted(trust_remote_code: bool) -> bool:
    return bool(trust_remote_code or _remote_code.get())


def _remote_code_error(path: str, e: Exception) -> ModelError | None:
    if "trust_remote_code" not in str(e):
        return None
    return ModelError(f"{path}: the model asks to run its own code (auto_map in its config); nothing was run. "
                      "Pass --trust-remote-code (Python: trust_remote_code=True) if you trust its source")


@dataclass
class LoadedModel:
    """A model ready to use. `model` may be a `PeftModel` (adapter kept) or a plain causal LM (adapter merged)."""

    model: torch.nn.Module
    tokenizer: object
    spec: str


def auto_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def auto_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        except KeyError:
            raise ModelError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16") from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "manifest.json").is_file() and (p / "adapter").is_dir()


def run_base(path: str | Path) -> str:
    """The base-model spec a run directory was trained on."""
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    try:
        return manifest["base_model"]
    except KeyError:
        raise ModelError(f"{path}/manifest.json: missing field 'base_model'") from None


def canonical_spec(spec: str) -> str:
    """Absolute path for local paths (so a manifest stays valid from any working directory), the spec otherwise."""
    if spec.startswith("builtin:"):
        return spec
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _resolve_plain(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) of a model that is not a run directory."""
    if spec.startswith("builtin:"):
        from .builtin import builtin_model_path

        return str(builtin_model_path(spec)), None
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p), ggufs[0].name
            raise ModelError(f"{p}: not a model directory (no config.json, no single .gguf file)")
        return str(p), None
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, None  # hub id
    raise ModelError(f"{spec}: no such model directory, file, builtin model or hub id")


def load_gguf_as_plain(path: str, gguf_file: str, dtype: torch.dtype = torch.float32, **kwargs):
    """Dequantise a GGUF checkpoint into an ordinary model (trainable, and writable with `save_pretrained`)."""
    from transformers import AutoModelForCausalLM

    dequantised = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype, **kwargs)
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(dequantised.state_dict(), strict=True)
    return model


def load_tokenizer(path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and gguf_file is None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)}); save the "
                         "tokenizer beside the model (tokenizer.save_pretrained)")
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=_trusted(trust_remote_code))
    except Exception as e:
        remote = _remote_code_error(path, e)
        if remote is not None:
            raise remote from None
        raise ModelError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"{path}: tokenizer has neither a pad token nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def _bnb_config(quantization: Quantization, compute_dtype: torch.dtype):
    if not torch.cuda.is_available():
        raise ModelError(
            f"quantization={quantization} needs a CUDA GPU (bitsandbytes 4/8-bit training); none is present. "
            "Use quantization: none on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(f"quantization={quantization} needs bitsandbytes: pip install 'llm_attr[quant]'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def check_causal(path: str) -> None:
    """Refuse a local model whose config.json describes an encoder or encoder-decoder (read as JSON: runs nothing)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{config_file}: unreadable model config ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        return  # transformers says what is wrong with it
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder")
    if encoder or config.get("is_encoder_decoder"):
        kind = "an encoder-decoder" if config.get("is_encoder_decoder") else "an encoder (masked LM)"
        raise ModelError(f"{path}: a {model_type!r} model is {kind}, not a causal language model; llm_attr "
                         "attributes decoder-only causal LMs")


def _load_plain(
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Quantization,
    attn_implementation: str | None,
    trust_remote_code: bool,
):
    from transformers import AutoModelForCausalLM

    path, gguf_file = _resolve_plain(spec)
    if not gguf_file:
        check_causal(path)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        if gguf_file:
            kwargs.pop("gguf_file")
            model = load_gguf_as_plain(path, gguf_file, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        remote = _remote_code_error(path, e)
        if remote is not None:
            raise remote from None
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            raise ModelError(f"{path}: not a causal language model ({e.__class__.__name__}: {e})") from None
        raise ModelError(f"{path}: cannot load model ({e})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot load model ({e})") from None
    if quantization == "none":
        model.to(device)
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = load_tokenizer(path, gguf_file, trust_remote_code)
    return model, tokenizer


def load_model(
    spec: str,
    *,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    quantization: Quantization = "none",
    attn_implementation: str | None = None,
    merge_adapters: bool = True,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `spec`: `builtin:tiny`, `builtin:smollm2-135m`, a model directory, a `.gguf` file, a hub id or a run dir.

    Run directories: their adapters are merged into the weights (`merge_adapters=True`, the default: the result is
    a plain model that new adapters stack on) or kept as a frozen `PeftModel` (always, when quantized).
    """
    device = torch.device(device) if device is not None else auto_device()
    torch_dtype = auto_dtype(device, dtype)
    if is_run_dir(spec):
        base = load_model(
            run_base(spec),
            device=device,
            dtype=dtype,
            quantization=quantization,
            attn_implementation=attn_implementation,
            merge_adapters=merge_adapters,
            trust_remote_code=trust_remote_code,
        )
        model = base.model
        if hasattr(model, "merge_and_unload"):  # a base that kept its own adapter (quantized chain)
            model = model.merge_and_unload() if quantization == "none" else model
        adapter = contained_path(spec, "adapter", f"{spec}: run directory's adapter/")
        peft_model = load_adapter(model, str(adapter), trainable=False)
        if merge_adapters and quantization == "none":
            model = peft_model.merge_and_unload()
        else:
            model = peft_model
        from .loading import load_tokenizer as _lt

        tokenizer = _lt(str(spec)) if (Path(spec) / "tokenizer_config.json").is_file() else base.tokenizer
        return LoadedModel(model=model, tokenizer=tokenizer, spec=canonical_spec(spec))
    model, tokenizer = _load_plain(spec, device, torch_dtype, quantization, attn_implementation,
                                   _trusted(trust_remote_code))
    return LoadedModel(model=model, tokenizer=tokenizer, spec=canonical_spec(spec))
