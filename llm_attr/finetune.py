"""`llm-attr finetune`: LoRA fine-tuning into a run directory that every later command accepts as `--model`.

A run directory holds `adapter/` (peft), the tokenizer, `config.yaml` (the resolved config) and `manifest.json`
(base model, data fingerprint, seed, final training loss), written last: a directory without it is unfinished.
While training, `checkpoints/` holds the state of the last `save_steps` boundary; a re-run resumes from it.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .config import save_config, to_dict
from .data.records import Record, as_records, load_records, records_fingerprint
from .data.tokenize import pad_id_of, tokenize_records
from .errors import RunDirError
from .io import atomic_write_json, fingerprint, locked
from .losses import autocast
from .models.loading import load_model
from .models.lora import LoraArgs, attach_lora
from .models.prefix_cache import prefix_cache
from .training import Checkpointing, TrainingArgs, train

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TrainingArgs):
    """`configs/finetune.yaml`: optimisation (see TrainingArgs), the LoRA adapter, and how the base is loaded."""

    lora: LoraArgs = field(default_factory=LoraArgs, metadata={"help": "the LoRA adapter to train"})
    quantization: Literal["none", "4bit", "8bit"] = field(default="none", metadata={"help": "load the base in 4bit or 8bit through bitsandbytes (GPU only), or none"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16"})
    attn_implementation: str | None = field(default=None, metadata={"help": "attention kernel passed to transformers (eager, sdpa, ...); null: its default"})
    save_steps: int = field(default=50, metadata={"help": "optimiser steps between checkpoints (0: none); a killed "
                                                          "run resumes from the last one"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0, got {self.save_steps}")


CHECKPOINTS = "checkpoints"


def check_run_dir(out: Path, kind: str, fp: str, overwrite: bool) -> bool:
    """True if `out` already holds a complete run of this config; refuse a run with a different config."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return False
    old = json.loads(manifest.read_text())
    if overwrite:
        return False
    if old.get("kind") != kind or old.get("fingerprint") != fp:
        from .store import describe_manifest

        what = f"a {kind!r} run" if old.get("kind") == kind else describe_manifest(old)
        raise RunDirError(f"{out}: already holds {what} with a different model, data or config; choose another "
                          "--out or pass --overwrite")
    return old.get("complete", False)


@locked("finetune")
def finetune(
    model: str,
    train_data: str | Path | list,
    out: str | Path,
    config: FinetuneConfig | None = None,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    columns: dict[str, str] | None = None,
) -> Path:
    """Fine-tune a new LoRA adapter on `model` (any spec `load_model` takes) and write a run directory `out`.

    `train_data`: a JSONL file, a saved dataset directory, a hub dataset name, or a list of records;
    `columns` maps our field names to the data's (`{"prompt": "question", "response": "answer"}`).
    """
    from accelerate import Accelerator

    from .pipeline import check_out

    config = config or FinetuneConfig()
    out = Path(out)
    check_out(out, "finetune", {"train": train_data, "model": model}, overwrite=overwrite, resumable=(CHECKPOINTS,))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    records: list[Record] = (
        load_records(train_data, columns=columns) if isinstance(train_data, (str, Path)) else as_records(train_data)
    )
    source = str(train_data) if isinstance(train_data, (str, Path)) else "records"
    outcome = {k: v for k, v in to_dict(config).items() if k != "save_steps"}  # what changes the adapter
    fp = fingerprint({"model": str(model), "data": records_fingerprint(records), "config": outcome})
    if check_run_dir(out, "finetune", fp, overwrite):
        logger.info("%s: already complete, nothing to do", out)
        return out
    if overwrite and accelerator.is_main_process:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    t0 = time.time()
    loaded = load_model(
        model,
        device=accelerator.device,
        dtype=config.dtype,
        quantization=config.quantization,
        attn_implementation=config.attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = loaded.tokenizer
    examples, report = tokenize_records(records, tokenizer, config.max_length, source=source)
    torch.manual_seed(config.seed)
    peft_model = attach_lora(loaded.model, config.lora)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info(
        "fine-tuning %s on %d examples (%d trainable LoRA parameters)", loaded.spec, len(examples), n_trainable
    )
    checkpoint = Checkpointing(out / CHECKPOINTS, config.save_steps, fp) if config.save_steps else None
    from .training import _num_steps
    from .utils import Overall

    steps = _num_steps(config, len(examples), accelerator.num_processes)
    overall = Overall(steps if accelerator.is_main_process else 0, "fine-tuning step", log=logger, bar=False)
    pad_id = pad_id_of(tokenizer)
    # with `lora.layers` the bottom layers are frozen: their outputs are computed once (models.prefix_cache)
    with prefix_cache(peft_model, examples, pad_id, batch_size=config.batch_size,
                      autocast=functools.partial(autocast, config.precision, accelerator.device)):
        result = train(peft_model, examples, config, pad_id, accelerator=accelerator,
                       checkpoint=checkpoint, on_step=lambda step: overall.update(step - overall.count))
    overall.close()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(peft_model)
        unwrapped.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out)
        save_config(config, out / "config.yaml")
        atomic_write_json(
            out / "manifest.json",
            {
                "kind": "finetune",
                "complete": True,
                "fingerprint": fp,
                "base_model": loaded.spec,
                "data": {"source": source, "fingerprint": records_fingerprint(records), "n_examples": len(records)},
                "truncation": {"n_truncated": report.n_truncated, "tokens_lost": report.prompt_tokens_lost
                               + report.response_tokens_lost},
                "seed": config.seed,
                "steps": result.steps,
                "resumed_from_step": result.resumed_from,
                "final_loss": result.final_loss,
                "trainable_parameters": n_trainable,
                "seconds": round(time.time() - t0, 2),
            },
        )
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the adapter is complete: the checkpoints are spent
        logger.info("saved %s (final training loss %.4f, %d steps)", out, result.final_loss, result.steps)
    accelerator.wait_for_everyone()
    return out
