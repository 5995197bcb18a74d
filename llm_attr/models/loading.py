"""Load a causal LM and its tokenizer from whatever a user holds: a builtin name, a hub id, a model directory (full or
merged weights), a GGUF file, a peft adapter folder, a Trainer/TRL `checkpoint-N` or output folder, or a run directory.

`detect_model` says which form a spec is (and `load_model` logs it). An adapter on a base (a peft adapter folder, a
checkpoint holding one, a run directory written by `llm-attr finetune`) loads its base (recursively: a run may build on
a run) and merges or stacks the adapter; the base comes from `adapter_config.json` (`base_model_name_or_path`) or the
run's `manifest.json`, unless `--base` (`base_model(...)`, `load_model(base=...)`) names another.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import re
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
_base_override = contextvars.ContextVar("llm_attr_base_model", default=None)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
#: What a `--model` may be, for the one-line error when a path is none of them.
MODEL_FORMS = ("a model directory (config.json), a peft adapter folder (adapter_config.json + "
               "adapter_model.safetensors), a Trainer/TRL checkpoint-N or output folder, a .gguf file, a run directory "
               "(manifest.json + adapter/), a hub id or builtin:tiny")


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


@contextlib.contextmanager
def base_model(base: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, an adapter given as the model is loaded onto `base` (a directory or hub id) instead of the
    base its `adapter_config.json` names: what `--base` does, for when the base lives elsewhere on this machine."""
    token = _base_override.set(None if base is None else os.fspath(base))
    try:
        yield
    finally:
        _base_override.reset(token)


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


def is_run_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "manifest.json").is_file() and (p / "adapter").is_dir()


@dataclass(frozen=True)
class ModelSource:
    """What a model spec holds, as `detect_model` found it.

    form: `builtin`, `hub`, `gguf`, `model` (full or merged weights), `adapter` (a peft adapter folder, a checkpoint
    holding one), or `run` (a run directory). path: what to load (the adapter folder for `adapter` and `run`).
    base: the base spec an adapter loads onto. described: the form in words, for the log.
    """

    form: str
    path: str
    base: str | None = None
    described: str = ""


def _adapter_files(p: Path) -> bool:
    return (p / "adapter_config.json").is_file()


def _last_checkpoint(p: Path) -> Path | None:
    """The highest-numbered `checkpoint-N` subfolder of a Trainer output folder, or None."""
    found = [(int(m.group(1)), q) for q in p.iterdir() if q.is_dir() and (m := _CHECKPOINT.match(q.name))]
    return max(found)[1] if found else None


def _adapter_base(folder: Path, override: str | None) -> str:
    """The base an adapter folder loads onto: `override`, else `base_model_name_or_path` of its peft config."""
    if override:
        return canonical_spec(override)
    from peft import PeftConfig

    try:
        base = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    except Exception as e:
        raise ModelError(f"{folder}/adapter_config.json: unreadable peft config ({type(e).__name__}: {e})") from None
    if not base:
        raise ModelError(f"{folder}/adapter_config.json: field 'base_model_name_or_path' is empty; pass --base "
                         "DIR_OR_ID (the model the adapter was trained on)")
    local = Path(base).expanduser()
    if not local.exists() and (base.startswith((".", "/", "~")) or base.count("/") > 1):
        raise ModelError(f"{folder}/adapter_config.json: its base {base!r} is not on this machine; pass --base "
                         "DIR_OR_ID (the model the adapter was trained on)")
    return canonical_spec(base)


def detect_model(spec: str | os.PathLike, base: str | os.PathLike | None = None) -> ModelSource:
    """Which form `spec` is (see `ModelSource`); a path that is none of them is a `ModelError` saying what to pass.

    `base` (default: `--base`, the `base_model` block) overrides the base of an adapter or run directory.
    """
    spec = os.fspath(spec)
    override = os.fspath(base) if base is not None else _base_override.get()
    if spec.startswith("builtin:"):
        return ModelSource("builtin", spec, described=f"builtin model {spec}")
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            return ModelSource("gguf", str(p), described=f"GGUF file {p.name}")
        if p.name in ("adapter_config.json", "config.json", "adapter_model.safetensors"):
            return detect_model(p.parent, base)
        raise ModelError(f"{p}: a file that is not a model; pass {MODEL_FORMS}")
    if p.is_dir():
        if is_run_dir(p):
            return ModelSource("run", str(p / "adapter"), override or run_base(p), f"run directory {p}")
        if _adapter_files(p):
            if not (p / "adapter_model.safetensors").is_file():
                from .lora import load_adapter  # its message: a pickled adapter, or no weights at all

                load_adapter(None, str(p))
            kind = "Trainer checkpoint holding a peft adapter" if _CHECKPOINT.match(p.name) else "peft adapter folder"
            return ModelSource("adapter", str(p), _adapter_base(p, override), f"{kind} {p}")
        if (p / "config.json").is_file():
            kind = "Trainer checkpoint with full weights" if _CHECKPOINT.match(p.name) else "model directory"
            return ModelSource("model", str(p), described=f"{kind} {p} (full or merged weights)")
        last = _last_checkpoint(p)
        if last is not None:
            inner = detect_model(last, base)  # a Trainer output folder without a final model
            return dataclasses.replace(inner, described=f"{inner.described} (the last checkpoint of the Trainer "
                                                        f"output folder {p})")
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]), described=f"GGUF file {ggufs[0].name}")
        what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "nothing loadable"
        raise ModelError(f"{p}: not a model directory ({what}); pass {MODEL_FORMS}")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource("hub", spec, described=f"hub id {spec}")
    raise ModelError(f"{spec}: no such model directory, file, builtin model or hub id; pass {MODEL_FORMS}")


def adapter_of(spec: str | os.PathLike) -> tuple[str, Path] | None:
    """(base spec, adapter folder) of a spec that is an adapter on a base (a run directory, a peft adapter folder, a
    checkpoint holding one); None for a whole model."""
    try:
        source = detect_model(spec)
    except ModelError:
        return None
    return (source.base, Path(source.path)) if source.form in ("adapter", "run") else None


def run_base(path: str | os.PathLike) -> str:
    """The base-model spec a run directory was trained on."""
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    try:
        return manifest["base_model"]
    except KeyError:
        raise ModelError(f"{path}/manifest.json: missing field 'base_model'") from None


def canonical_spec(spec: str | os.PathLike) -> str:
    """Absolute path for local paths (so a manifest stays valid from any working directory), the spec otherwise."""
    spec = os.fspath(spec)
    if spec.startswith("builtin:"):
        return spec
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _resolve_plain(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) of a whole model (not an adapter on a base)."""
    source = detect_model(spec)
    if source.form == "builtin":
        from .builtin import builtin_model_path

        return str(builtin_model_path(spec)), None
    if source.form == "gguf":
        return str(Path(source.path).parent), Path(source.path).name
    if source.form in ("adapter", "run"):
        raise ModelError(f"{spec}: an adapter, not a whole model (its base: {source.base})")
    return source.path, None


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
    spec: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    quantization: Quantization = "none",
    attn_implementation: str | None = None,
    merge_adapters: bool = True,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `spec`, any form `detect_model` knows (the form found is logged): `builtin:tiny`, a hub id, a model
    directory, a `.gguf` file, a peft adapter folder, a Trainer/TRL checkpoint or output folder, a run directory.

    `base` loads an adapter onto another base than its `adapter_config.json` names. Adapters (and run directories)
    are merged into the weights (`merge_adapters=True`, the default: the result is a plain model that new adapters
    stack on) or kept as a frozen `PeftModel` (always, when quantized).
    """
    spec = os.fspath(spec)
    device = torch.device(device) if device is not None else auto_device()
    torch_dtype = auto_dtype(device, dtype)
    source = detect_model(spec, base)
    logger.info("model: %s", source.described)
    if source.form in ("adapter", "run"):
        with base_model(None):  # the override is this adapter's base only
            base_loaded = load_model(source.base, device=device, dtype=dtype, quantization=quantization,
                                     attn_implementation=attn_implementation, merge_adapters=merge_adapters,
                                     trust_remote_code=trust_remote_code)
        return _with_adapter(spec, source, base_loaded, quantization, merge_adapters)
    model, tokenizer = _load_plain(spec, device, torch_dtype, quantization, attn_implementation,
                                   _trusted(trust_remote_code))
    return LoadedModel(model=model, tokenizer=tokenizer, spec=canonical_spec(spec))


def _with_adapter(spec: str, source: ModelSource, base: LoadedModel, quantization: Quantization,
                  merge_adapters: bool) -> LoadedModel:
    """`base` with the adapter of `source` loaded (merged unless kept); the tokenizer saved beside the adapter (or
    in the run directory) if there is one, else the base's."""
    model = base.model
    if hasattr(model, "merge_and_unload"):  # a base that kept its own adapter (quantized chain)
        model = model.merge_and_unload() if quantization == "none" else model
    if source.form == "run":
        adapter = contained_path(spec, "adapter", f"{spec}: run directory's adapter/")
    else:
        adapter = Path(source.path)
    peft_model = load_adapter(model, str(adapter), trainable=False)
    model = peft_model.merge_and_unload() if merge_adapters and quantization == "none" else peft_model
    own = Path(spec) if source.form == "run" else adapter
    has_tokenizer = (own / "tokenizer_config.json").is_file() or (own / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(str(own)) if has_tokenizer else base.tokenizer
    return LoadedModel(model=model, tokenizer=tokenizer, spec=canonical_spec(spec))



#: The public name of `_resolve_plain`: (local path or hub id, GGUF file name or None) of a plain model spec.
resolve_plain = _resolve_plain
