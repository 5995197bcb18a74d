"""The local backend: the project's own LoRA fine-tuning loop and per-example loss, behind the black-box protocol.

The reference implementation that tests compare services with. A job is a folder `WORK/JOB_ID/` holding `job.json`
(base model, hyperparameters, seed, tag) and `train.jsonl`; `submit_finetune` only writes it (instant), `wait`
trains a fresh zero-initialised LoRA adapter on top of the base (a run directory's adapter merged in) with the plain
loss objective (no first-order term) and saves it to `WORK/JOB_ID/adapter/`: that directory is the model id. A job
killed mid-training is trained again by the next `wait`; a finished one is never retrained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.records import Record, as_records, records_fingerprint, save_jsonl
from ..data.tokenize import pad_id_of, token_lengths, tokenize_records
from ..errors import ConfigError, ModelError
from ..io import atomic_write_json, fingerprint
from ..models.lora import LoraArgs
from ..models.prefix_cache import PrefixCache, open_prefix_cache, state_mb
from .base import Backend, BackendError, TokenLogprobs

logger = logging.getLogger(__name__)

SIGNALS = ("loss", "margin")
ADAPTER = "adapter"


def training_field(name: str) -> Any:
    """A field with `TrainingArgs`' default and help for `name` (the job's fine-tune uses those settings)."""
    from ..config import field_help
    from ..training import TrainingArgs

    return field(default=TrainingArgs.__dataclass_fields__[name].default,
                 metadata={"help": field_help(TrainingArgs, name)})


@dataclass
class LocalBackendArgs:
    """`local:` section of the black-box config: the local fine-tune (epochs/lr/batch come from the job)."""

    lora: LoraArgs = field(default_factory=LoraArgs, metadata={"help": "the adapter each job trains"})
    max_length: int = training_field("max_length")
    warmup_ratio: float = training_field("warmup_ratio")
    weight_decay: float = training_field("weight_decay")
    max_grad_norm: float = training_field("max_grad_norm")
    max_steps: int = field(default=0, metadata={"help": "optimiser steps per job; > 0 overrides the job's epochs"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of response_signals"})
    prefix_cache_mb: float = field(default=2048.0, metadata={"help": (
        "with lora.layers, the frozen layers below the adapter are computed once per example for every job of a "
        "session, training and scoring (models.prefix_cache; exact): up to this many MB of states, 0 = off")})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})


def job_seeds(seed: int) -> tuple[int, int]:
    """(LoRA init seed, data order seed) of a job, both drawn from its one `seed`."""
    init, order = (int(s) for s in np.random.SeedSequence([seed]).generate_state(2))
    return init, order


class LocalBackend(Backend):
    """Fine-tunes and scores on this machine. Thread-safe (one lock around the model): the test server shares it."""

    name = "local"
    paid = False
    signals = SIGNALS
    token_logprobs = True

    def __init__(self, args: LocalBackendArgs | None = None, work_dir: str | Path | None = None,
                 device: torch.device | str | None = None):
        self.args = args or LocalBackendArgs()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.device = device
        self._lock = threading.RLock()
        self._base: str | None = None
        self._session: tuple[Any, Any, Any] | None = None  # (PerturbationModel, tokenizer, accelerator)
        self._loaded_adapter: str | None = None
        self._prefix: PrefixCache | None = None  # the session's frozen-prefix states, shared by every job
        self._prefix_off = False

    # ------------------------------------------------------------------ protocol

    def prepare(self, run_dir: Path) -> None:
        if self.work_dir is None:
            self.work_dir = Path(run_dir) / "jobs"

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.args)}

    def model_fingerprint(self, base_model_id: str) -> str:
        from ..fingerprints import model_fingerprint

        return model_fingerprint(base_model_id)

    def _jobs(self) -> Path:
        if self.work_dir is None:
            raise BackendError("local backend: no work directory (pass work_dir, or call prepare(run_dir))")
        return self.work_dir

    def submit_finetune(self, base_model_id: str, training_records: Sequence[Record],
                        hyperparameters: dict[str, Any], seed: int, *, tag: str | None = None) -> str:
        """Write the job folder (base, records, hyperparameters, seed); training happens in `wait`."""
        records = as_records(list(training_records))
        hp = {k: hyperparameters.get(k) for k in ("epochs", "batch_size", "learning_rate")}
        if any(v is None for v in hp.values()):
            raise ConfigError(f"local backend: hyperparameters need epochs, batch_size and learning_rate, got {hp}")
        spec = {"base_model_id": base_model_id, "hyperparameters": hp, "seed": int(seed), "tag": tag,
                "records": records_fingerprint(records), "args": dataclasses.asdict(self.args)}
        job_id = f"local-{fingerprint(spec)}"
        folder = self._jobs() / job_id
        if not (folder / "job.json").is_file():
            save_jsonl(records, folder / "train.jsonl")
            atomic_write_json(folder / "job.json", {**spec, "job_id": job_id, "n_records": len(records)})
        logger.info("local job %s: %d records, seed %d", job_id, len(records), seed)
        return job_id

    def find_job(self, tag: str) -> str | None:
        for path in sorted(self._jobs().glob("*/job.json")):
            if json.loads(path.read_text()).get("tag") == tag:
                return path.parent.name
        return None

    def wait(self, job_id: str, *, timeout: float | None = None) -> str:
        """Train the job if its adapter is not saved yet (`timeout` does not apply: it runs here); returns the
        adapter directory (the model id)."""
        folder = self._jobs() / job_id
        adapter = folder / ADAPTER
        if (adapter / "adapter_model.safetensors").is_file():
            return str(adapter)
        if not (folder / "job.json").is_file():
            raise BackendError(f"local job {job_id}: no such job in {self._jobs()}")
        job = json.loads((folder / "job.json").read_text())
        records = as_records(str(folder / "train.jsonl"))
        hp = job["hyperparameters"]
        with self._lock:
            pm, tokenizer, accelerator = self._load(job["base_model_id"])
            from ..training import TrainingArgs, plain_objective, train

            init_seed, order_seed = job_seeds(job["seed"])
            args = TrainingArgs(epochs=float(hp["epochs"]), max_steps=self.args.max_steps,
                                learning_rate=float(hp["learning_rate"]), batch_size=int(hp["batch_size"]),
                                warmup_ratio=self.args.warmup_ratio, weight_decay=self.args.weight_decay,
                                max_grad_norm=self.args.max_grad_norm, max_length=self.args.max_length,
                                seed=order_seed)
            examples, _ = tokenize_records(records, tokenizer, self.args.max_length, source=f"job {job_id}")
            pm.reset(init_seed)
            self._loaded_adapter = None
            with self._frozen_prefix(pm.model, examples, pad_id_of(tokenizer)):
                result = train(pm.model, examples, args, pad_id_of(tokenizer), accelerator=accelerator,
                               objective=plain_objective, data_parallel=False, desc=f"job {job_id}")
            pm.save(adapter)
            self._loaded_adapter = str(adapter)
        logger.info("local job %s: %d steps, final loss %.4f", job_id, result.steps, result.final_loss)
        return str(adapter)

    def response_signals(self, model_id: str, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        from ..losses import evaluate_signal

        records = as_records(list(records))
        with self.use_model(model_id) as (model, tokenizer):
            examples, _ = tokenize_records(records, tokenizer, self.args.max_length, source="records")
            with self._frozen_prefix(model, examples, pad_id_of(tokenizer)):
                return evaluate_signal(model, examples, pad_id_of(tokenizer), batch_size=self.args.eval_batch_size,
                                       signal=SIGNALS)

    def response_token_logprobs(self, model_id: str, records: Sequence[Record]) -> list[TokenLogprobs]:
        """Each record's response-token log-probs (the project's own per-token NLL, negated) and the characters
        of its response text each token covers (`data.spans.token_chars`, as white-box Daunce maps them)."""
        from ..data import spans
        from ..losses import evaluate_token_signals

        records = as_records(list(records))
        with self.use_model(model_id) as (model, tokenizer):
            examples, _ = tokenize_records(records, tokenizer, self.args.max_length, source="records")
            with self._frozen_prefix(model, examples, pad_id_of(tokenizer)):
                nll = evaluate_token_signals(model, examples, pad_id_of(tokenizer),
                                             batch_size=self.args.eval_batch_size, signals=("loss",))["loss"]
            chars = spans.query_token_chars(records, examples, tokenizer)
        return [TokenLogprobs(-v, c) for v, c in zip(nll, chars, strict=True)]

    def count_tokens(self, base_model_id: str, records: Sequence[Record]) -> tuple[list[int], bool]:
        with self._lock:
            _, tokenizer, _ = self._load(base_model_id)
            examples, _ = tokenize_records(as_records(list(records)), tokenizer, self.args.max_length)
        return token_lengths(examples), True

    # ------------------------------------------------------------------ the model

    @contextlib.contextmanager
    def use_model(self, model_id: str) -> Iterator[tuple[torch.nn.Module, Any]]:
        """Hold the lock with the fine-tuned model `model_id` (an adapter directory of a job) loaded:
        yields (model, tokenizer)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = Path(model_id)
        job_file = adapter.parent / "job.json"
        if not (adapter / "adapter_model.safetensors").is_file() or not job_file.is_file():
            raise BackendError(f"local backend: {model_id} is not the adapter of a finished local job")
        with self._lock:
            pm, tokenizer, _ = self._load(json.loads(job_file.read_text())["base_model_id"])
            if self._loaded_adapter != str(adapter):
                state = load_file(str(adapter / "adapter_model.safetensors"))
                result = set_peft_model_state_dict(pm.model, state)
                if getattr(result, "unexpected_keys", None):
                    raise ModelError(f"{adapter}: adapter does not fit this backend's LoRA settings "
                                     f"(unexpected keys {result.unexpected_keys[:3]}...)")
                self._loaded_adapter = str(adapter)
            yield pm.model, tokenizer

    @contextlib.contextmanager
    def _frozen_prefix(self, model: torch.nn.Module, examples, pad_id: int) -> Iterator[None]:
        """While the block runs, batches of `examples` start at the adapter's first layer from states computed once
        in this session (every job shares the base and its frozen layers); the whole model runs where the cache is
        off (every layer adapted, dropout below, over `prefix_cache_mb`, or not reproducing the full forward)."""
        cache = self._prefix
        if cache is None and not self._prefix_off:
            cache = open_prefix_cache(model, examples, pad_id, batch_size=self.args.eval_batch_size,
                                      max_mb=self.args.prefix_cache_mb) if self.args.prefix_cache_mb > 0 else None
            self._prefix, self._prefix_off = cache, cache is None
        elif cache is not None:
            new = cache.missing(examples)
            if new and cache.nbytes() / 2**20 + state_mb(model, new) <= self.args.prefix_cache_mb:
                cache.add(new, pad_id, batch_size=self.args.eval_batch_size)
        if cache is None:
            yield
            return
        with cache.active():
            yield

    def _load(self, base_model_id: str):
        """(PerturbationModel, tokenizer, accelerator) of `base_model_id`, loaded once (and again for another base)."""
        if self._session is not None and self._base == base_model_id:
            return self._session
        from ..context import run_context
        from ..models.loading import auto_device
        from ..runner import PerturbationModel, load_target

        accelerator = run_context().accelerator()
        device = torch.device(self.device) if self.device is not None else auto_device()
        net, tokenizer = load_target(base_model_id, "new", device, self.args.dtype)
        pm = PerturbationModel(net, "new", self.args.lora)
        n_trainable = sum(p.numel() for p in pm.trainable.values())
        logger.info("local backend: %s loaded, %d trainable LoRA parameters per job", base_model_id, n_trainable)
        self._base, self._session, self._loaded_adapter = base_model_id, (pm, tokenizer, accelerator), None
        self._prefix, self._prefix_off = None, False  # a new base: its own frozen states
        return self._session
