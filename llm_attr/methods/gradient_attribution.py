"""GradientAttribution: Grad-Dot, Grad-Cos, TracIn and influence (damped Fisher, K-FAC, EK-FAC) through the store.

Featurize: per-example (LoGra-projected) gradients of every training and query example (`GradientExtractor`),
written in blocks of `block_size` examples, one shard per block (`gradients [n, d]` in `store_dtype`, `losses [n]`
float32, and the block's K-FAC statistics when the method needs them). Under `accelerate launch` process r computes
the blocks r, r + P, ... of one list; K-FAC statistics are merged in block order, so the result does not depend on P.
Fit: the main process fits the preconditioner on the stored training gradients (a shard). Score: the query gradients
are preconditioned once and the training blocks streamed through `scoring.score_inner_products` into
`RUN/scores.safetensors` (float32 `[n_query, n_train]`), `ids.json`, `topk.md` and `scores.json`.

Shards of a gradient store (`c` the checkpoint, `b` the block):

    projection               p_in.<layer> / p_out.<layer> (none when projection_rank is 0)
    pca-BBBBB                unprojected input / output-gradient statistics of train block b (projection: pca)
    train-cC-BBBBB           gradients [n, d], losses [n], K-FAC statistics (if-kfac / if-ekfac)
    query-cC-BBBBB           gradients [n, d], losses [n]
    preconditioner           the fitted preconditioner; meta: method and damping it was fitted with

See DESIGN.md section 4; the sign convention (positive: the training example helps the query) is the package's.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import to_dict
from ..data.records import as_records, records_fingerprint, save_jsonl
from ..data.tokenize import Example, collate, pad_id_of, token_lengths, tokenize_records
from ..errors import ConfigError, RunDirError
from ..io import atomic_write_json, file_fingerprint, fingerprint, locked
from ..scoring import (
    ScoreFile,
    format_topk,
    record_text,
    score_inner_products,
    topk_rows,
    write_ids,
    write_topk_table,
)
from ..store import Store, model_fingerprint, module_fingerprint
from .gradients import GradientExtractor, KroneckerFactors, LayerBlock
from .preconditioners import EKFAC, KFAC, Cosine, DampedFisher, Preconditioner

logger = logging.getLogger(__name__)

METHOD = "gradients"
GradientMethod = Literal["grad-dot", "grad-cos", "tracin", "if-fisher", "if-kfac", "if-ekfac"]
METHODS: tuple[str, ...] = ("grad-dot", "grad-cos", "tracin", "if-fisher", "if-kfac", "if-ekfac")
FACTOR_METHODS = ("if-kfac", "if-ekfac")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Elements of one chunk of training gradients read back for fitting and scoring (32 MiB of float64).
CHUNK_ELEMENTS = 1 << 22
#: Elements of one chunk of training gradients read back for scoring (64 MiB of float32): at d ~ 70k that is 240
#: rows, where the product with the queries runs at the matmul's speed (60 rows ran at half of it).
SCORE_CHUNK_ELEMENTS = 1 << 24
#: d above which the damped Fisher is fitted in float32 rather than float64 (d x d float64 = 512 MiB here).
FISHER_FLOAT64_MAX_DIM = 8192


@dataclass
class Checkpoint:
    """A TracIn checkpoint: a peft adapter directory (or a fine-tuned run directory) and its learning rate."""

    adapter: str
    lr: float = 1.0


@dataclass
class GradientConfig:
    """`configs/gradients.yaml`: what to take gradients of, how to project and store them, how to score."""

    method: GradientMethod = field(default="if-ekfac", metadata={"help": "score: " + " | ".join(METHODS)})
    projection_rank: int = field(default=16, metadata={"help": "LoGra rank per side of each layer; 0: exact"})
    projection: Literal["gaussian", "pca"] = field(default="gaussian", metadata={"help": "random or PCA projections"})
    damping: float | None = field(default=None, metadata={"help": "absolute λ; null: relative_damping x mean eig."})
    relative_damping: float = field(default=0.1, metadata={"help": "λ = this x mean eigenvalue when damping is null"})
    params: str = field(default="lora", metadata={"help": "lora (the target's adapter) | a module-name regex"})
    store_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the stored gradients"}
    )
    batch_size: int = field(default=16, metadata={"help": "examples per forward/backward pass"})
    block_size: int = field(default=256, metadata={"help": "examples per shard (the unit of resume and of parallel work)"})
    seed: int = field(default=0, metadata={"help": "seed of the Gaussian projections"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (longer ones are truncated)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto | float32 | bfloat16 | float16"})
    checkpoints: list[Checkpoint] = field(
        default_factory=list, metadata={"help": "tracin: [{adapter: DIR, lr: float}, ...]; empty: the target, lr 1"}
    )

    def __post_init__(self) -> None:
        if self.projection_rank < 0:
            raise ValueError(f"projection_rank must be >= 0 (0: exact gradients), got {self.projection_rank}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.damping is not None and not self.damping >= 0:
            raise ValueError(f"damping must be >= 0 or null, got {self.damping}")
        if not self.relative_damping > 0:
            raise ValueError(f"relative_damping must be > 0, got {self.relative_damping}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.params != "lora":
            try:
                re.compile(self.params)
            except re.error as e:
                raise ValueError(f"params {self.params!r}: not 'lora' and not a valid regular expression ({e})") from None
        self.checkpoints = [Checkpoint(**c) if isinstance(c, dict) else c for c in self.checkpoints]
        for i, c in enumerate(self.checkpoints):
            if not c.adapter:
                raise ValueError(f"checkpoints[{i}].adapter is empty")
            if not math.isfinite(c.lr):
                raise ValueError(f"checkpoints[{i}].lr must be finite, got {c.lr}")
        if self.checkpoints and self.method != "tracin":
            logger.warning("checkpoints are used by method: tracin only; ignored for %s", self.method)
        if self.method == "tracin" and self.checkpoints and self.params != "lora":
            raise ValueError("tracin checkpoints are adapters: they need params: lora")

    @property
    def torch_store_dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.store_dtype]

    def effective_checkpoints(self) -> list[Checkpoint | None]:
        """The checkpoints gradients are taken at: TracIn's adapters, or `[None]` (the target as loaded)."""
        return list(self.checkpoints) if self.method == "tracin" and self.checkpoints else [None]


# ---------------------------------------------------------------------- store layout


def block_ranges(n: int, block_size: int) -> list[tuple[int, int]]:
    """`[(start, stop), ...]` of consecutive blocks of at most `block_size` rows covering `range(n)`."""
    return [(s, min(s + block_size, n)) for s in range(0, n, block_size)]


def gradient_shard(kind: Literal["train", "query"], checkpoint: int, block: int) -> str:
    return f"{kind}-c{checkpoint}-{block:05d}"


def pca_shard(block: int) -> str:
    return f"pca-{block:05d}"


def _adapter_file(adapter: str | Path) -> Path:
    """The `adapter_model.safetensors` of an adapter directory or of a run directory's `adapter/`."""
    p = Path(adapter)
    for candidate in (p / "adapter_model.safetensors", p / "adapter" / "adapter_model.safetensors"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"checkpoint {adapter}: no adapter_model.safetensors there (nor in {p / 'adapter'})")


def featurize_config(cfg: GradientConfig) -> dict[str, Any]:
    """What determines the shards (fingerprinted). The method, damping and batch_size (padding never changes a
    gradient) may change between re-runs of the same store; a K-FAC method recomputes train blocks without K-FAC
    statistics."""
    out: dict[str, Any] = {
        "projection_rank": cfg.projection_rank,
        "projection": cfg.projection if cfg.projection_rank else None,
        "params": cfg.params,
        "store_dtype": cfg.store_dtype,
        "block_size": cfg.block_size,
        "seed": cfg.seed if cfg.projection_rank and cfg.projection == "gaussian" else None,
        "max_length": cfg.max_length,
        "dtype": cfg.dtype,
    }
    checkpoints = cfg.effective_checkpoints()
    if checkpoints != [None]:
        out["checkpoints"] = [file_fingerprint(_adapter_file(c.adapter)) for c in checkpoints]
    return out


# ---------------------------------------------------------------------- the method


class GradientAttribution:
    """`GradientAttribution(config).run(model, train, query, out)`: gradients -> store -> preconditioner -> scores."""

    def __init__(self, config: GradientConfig | None = None):
        self.config = config or GradientConfig()
        self.computed: list[str] = []  # shards this process computed in the last run()
        self.scores: dict[str, Any] | None = None  # figures and text table of the last run's scoring (main process)

    def _on_shard_written(self, name: str) -> None:
        """Called after each gradient or statistics shard is written (a hook for tests and progress reporting)."""

    @locked("gradients")
    def run(
        self,
        model: str | Any,
        train: str | Path | list,
        query: str | Path | list,
        out: str | Path,
        *,
        overwrite: bool = False,
        score: bool = True,
        top_k: int = 10,
    ) -> Path:
        """Featurize (this process's missing blocks), then the main process fits and scores; returns `out`.

        model: a spec (a fine-tuned run dir: its adapter is kept for `params: lora`; a model dir, `builtin:tiny`
        with a `params` pattern) or a `LoadedModel`. train, query: JSONL paths, dataset dirs, or lists of records.
        Re-running the same command resumes; a different model, data or featurization is refused (RunDirError).
        """
        from accelerate import PartialState

        cfg = self.config
        state = PartialState(cpu=not torch.cuda.is_available())
        out = Path(out)
        train_records, query_records = as_records(train), as_records(query)
        if isinstance(model, str):
            from ..models.loading import canonical_spec

            spec, model_fp = canonical_spec(model), model_fingerprint(model)
        else:
            spec, model_fp = getattr(model, "spec", "in-memory model"), module_fingerprint(model.model)
        fp = fingerprint({"method": METHOD, "model": model_fp, "train": records_fingerprint(train_records),
                          "query": records_fingerprint(query_records), "featurize": featurize_config(cfg)})
        header = {
            "config": to_dict(cfg),
            "model": {"spec": spec, "fingerprint": model_fp},
            "ids": {"train": [r.id for r in train_records], "query": [r.id for r in query_records]},
            "dtype": cfg.store_dtype,
            "block_size": cfg.block_size,
        }
        store = Store.create(out, method=METHOD, fingerprint=fp, header=header, overwrite=overwrite,
                             is_main=state.is_main_process, barrier=state.wait_for_everyone)
        if state.is_main_process:
            for stale in ("scores.safetensors", "ids.json", "topk.md", "scores.json"):
                (out / stale).unlink(missing_ok=True)
            save_jsonl(train_records, out / "train.jsonl")
            save_jsonl(query_records, out / "query.jsonl")

        net, tokenizer = self._load(model, state.device)
        extractor = GradientExtractor(net, cfg.params, cfg.projection_rank, cfg.projection, cfg.seed)
        pad_id = pad_id_of(tokenizer)
        train_ex, _ = tokenize_records(train_records, tokenizer, cfg.max_length, source="train")
        query_ex, _ = tokenize_records(query_records, tokenizer, cfg.max_length, source="query")
        self.computed = []
        self._projection(store, extractor, train_ex, pad_id, state)  # before the layout: PCA fixes it here
        if state.is_main_process:
            store.update_manifest(
                layers=[vars(b) for b in extractor.layer_blocks],
                shapes={"train_gradients": [len(train_ex), extractor.dim],
                        "query_gradients": [len(query_ex), extractor.dim]},
                checkpoints=[None if c is None else vars(c) for c in cfg.effective_checkpoints()],
            )
        logger.info("gradients: %d train / %d query examples, %d layers, d = %d per example (%s)", len(train_ex),
                    len(query_ex), len(extractor.layers), extractor.dim,
                    f"projection rank {cfg.projection_rank}, {cfg.projection}" if cfg.projection_rank else "exact")
        self._gradients(store, extractor, train_ex, query_ex, pad_id, state)
        state.wait_for_everyone()
        self.scores = None
        if state.is_main_process:
            manifest = store.finalize(expected_shards(store.manifest))
            if not manifest["complete"]:
                raise RunDirError(f"{out}: some gradient blocks are missing after the run; re-run the same command")
            fit_preconditioner(store)
            if score:
                self.scores = score_run(out, top_k=top_k)
        state.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ model

    def _load(self, model: str | Any, device: torch.device) -> tuple[torch.nn.Module, Any]:
        """(model, tokenizer): a run directory keeps its adapter (`params: lora`) or is merged (a pattern)."""
        from ..models.loading import load_model

        if not isinstance(model, str):
            return model.model, model.tokenizer
        loaded = load_model(model, device=device, dtype=self.config.dtype,
                            merge_adapters=self.config.params != "lora")
        return loaded.model.requires_grad_(False).eval(), loaded.tokenizer

    # ------------------------------------------------------------------ projections

    def _projection(self, store: Store, extractor: GradientExtractor, train_ex: list[Example], pad_id: int,
                    state) -> None:
        """Gaussian: the main process records the seeded matrices. PCA: statistics per train block (split over
        processes), merged in block order by the main process, which fits and records the projection. Every process
        then uses the recorded projection (a resumed run keeps the one its shards were computed with)."""
        cfg = self.config
        if cfg.projection_rank == 0:
            return
        if cfg.projection == "pca" and store.missing(["projection"]):
            blocks = block_ranges(len(train_ex), cfg.block_size)
            mine = [b for b in range(len(blocks)) if b % state.num_processes == state.process_index]
            for b in store.missing([pca_shard(b) for b in mine]):
                index = int(b.rsplit("-", 1)[1])
                start, stop = blocks[index]
                t0 = time.time()
                stats = extractor.covariances(self._batches(train_ex[start:stop], pad_id))
                store.write_shard(b, stats.state_dict(),
                                  meta={"rows": [start, stop], "seconds": round(time.time() - t0, 3)})
                self._shard_done(b)
            state.wait_for_everyone()
            if state.is_main_process and store.missing(["projection"]):
                stats = KroneckerFactors()
                for b in range(len(blocks)):
                    stats.merge(KroneckerFactors.from_state_dict(store.read_shard(pca_shard(b))))
                extractor.fit_projection(stats)
                store.write_shard("projection", extractor.state_dict(), meta={"projection": "pca"})
        elif state.is_main_process and store.missing(["projection"]):
            store.write_shard("projection", extractor.state_dict(), meta={"projection": cfg.projection})
        state.wait_for_everyone()
        extractor.load_state_dict(store.read_shard("projection"))

    # ------------------------------------------------------------------ gradients

    def _batches(self, examples: list[Example], pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
        """Length-sorted batches of `examples`; `batch["index"]` holds positions in `examples`."""
        order = sorted(range(len(examples)), key=token_lengths(examples).__getitem__)
        for s in range(0, len(order), self.config.batch_size):
            idx = order[s : s + self.config.batch_size]
            batch = collate([examples[i] for i in idx], pad_id)
            batch["index"] = torch.tensor(idx)
            yield batch

    def block_gradients(self, extractor: GradientExtractor, examples: list[Example], pad_id: int,
                        factors: KroneckerFactors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradients `[n, d]` float32, losses `[n]` float32) of `examples`, rows in their order."""
        grads = torch.empty(len(examples), extractor.dim, dtype=torch.float32)
        losses = torch.empty(len(examples), dtype=torch.float32)
        for batch in self._batches(examples, pad_id):
            g = extractor.per_example(batch, factors)
            grads[batch["index"]] = g.cpu()
            losses[batch["index"]] = extractor.last_losses.cpu()
        return grads, losses

    def _gradients(self, store: Store, extractor: GradientExtractor, train_ex: list[Example],
                   query_ex: list[Example], pad_id: int, state) -> None:
        cfg = self.config
        checkpoints = cfg.effective_checkpoints()
        work = []  # (checkpoint, kind, block, start, stop) in one global order; process r takes r, r + P, ...
        for c in range(len(checkpoints)):
            for kind, examples in (("train", train_ex), ("query", query_ex)):
                for b, (start, stop) in enumerate(block_ranges(len(examples), cfg.block_size)):
                    work.append((c, kind, b, start, stop))
        mine = work[state.process_index :: state.num_processes]
        with_factors = cfg.method in FACTOR_METHODS
        todo = [w for w in mine if store.missing([gradient_shard(w[1], w[0], w[2])])
                or (with_factors and w[:2] == (0, "train") and not _has_factors(store, gradient_shard("train", 0, w[2])))]
        logger.info("process %d/%d: %d gradient blocks to compute (%d of its %d already done)", state.process_index,
                    state.num_processes, len(todo), len(mine) - len(todo), len(mine))
        if not todo:
            return
        restore = _adapter_state(extractor.model) if checkpoints != [None] else None
        try:
            current = None
            for c, kind, b, start, stop in todo:
                if checkpoints[c] is not None and c != current:
                    _load_checkpoint(extractor.model, checkpoints[c])
                    current = c
                t0 = time.time()
                examples = (train_ex if kind == "train" else query_ex)[start:stop]
                factors = KroneckerFactors() if with_factors and kind == "train" else None
                grads, losses = self.block_gradients(extractor, examples, pad_id, factors)
                tensors = {"gradients": grads.to(cfg.torch_store_dtype), "losses": losses}
                if factors is not None:  # float32 on disk (summed in float64 when merged): half the bytes
                    tensors.update({k: v.float() if v.is_floating_point() else v
                                    for k, v in factors.state_dict().items()})
                name = gradient_shard(kind, c, b)
                seconds = time.time() - t0
                store.write_shard(name, tensors, meta={"kind": kind, "checkpoint": c, "block": b,
                                                       "rows": [start, stop], "seconds": round(seconds, 3),
                                                       "process_index": state.process_index})
                logger.info("%s: %d examples in %.1fs", name, stop - start, seconds)
                self._shard_done(name)
        finally:
            if restore is not None:
                _set_adapter_state(extractor.model, restore)

    def _shard_done(self, name: str) -> None:
        self.computed.append(name)
        self._on_shard_written(name)


def _read_statistics(store: Store, name: str) -> dict[str, torch.Tensor]:
    """The K-FAC statistics of gradient shard `name` (float64), without reading its gradients."""
    from safetensors import safe_open

    if store.missing([name]):
        raise RunDirError(f"{store.root}: shard {name} is missing or corrupted; re-run `llm-attr gradients`")
    out = {}
    with safe_open(str(store.shard_path(name)), framework="pt") as f:
        for key in f.keys():
            if key not in ("gradients", "losses"):
                value = f.get_tensor(key)
                out[key] = value.double() if value.is_floating_point() else value
    return out


def _has_factors(store: Store, name: str) -> bool:
    """Whether gradient shard `name` holds its block's K-FAC statistics (written by if-kfac / if-ekfac runs)."""
    info = store.shard_info(name)
    return info is not None and "n_tokens" in info["tensors"]


# ---------------------------------------------------------------------- TracIn checkpoints


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _set_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ConfigError(f"checkpoint weights do not fit the target's adapter: unexpected keys {unexpected[:3]}")


def _load_checkpoint(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Load a TracIn checkpoint's adapter weights into the target's (same-shaped) adapter, in place."""
    from safetensors.torch import load_file

    if not hasattr(model, "peft_config"):
        raise ConfigError("tracin checkpoints need the target's LoRA adapter (a fine-tuned run directory as --model)")
    device = next(model.parameters()).device
    weights = load_file(str(_adapter_file(checkpoint.adapter)), device=str(device))
    try:
        _set_adapter_state(model, weights)
    except RuntimeError as e:  # shape mismatch
        raise ConfigError(f"checkpoint {checkpoint.adapter}: does not fit the target's adapter ({e})") from None
    logger.info("tracin: gradients at checkpoint %s (lr %g)", checkpoint.adapter, checkpoint.lr)


# ---------------------------------------------------------------------- fitting and scoring


def expected_shards(manifest: dict[str, Any]) -> list[str]:
    """Every gradient shard a complete store holds."""
    n_train, n_query = len(manifest["ids"]["train"]), len(manifest["ids"]["query"])
    bs = manifest["block_size"]
    names = []
    for c in range(len(manifest.get("checkpoints") or [None])):
        names += [gradient_shard("train", c, b) for b in range(len(block_ranges(n_train, bs)))]
        names += [gradient_shard("query", c, b) for b in range(len(block_ranges(n_query, bs)))]
    return names


def _layer_blocks(manifest: dict[str, Any]) -> list[LayerBlock]:
    return [LayerBlock(**b) for b in manifest["layers"]]


def _check_complete(store: Store) -> dict[str, Any]:
    manifest = store.manifest
    missing = store.missing(expected_shards(manifest))
    if missing:
        raise RunDirError(f"{store.root}: {len(missing)} gradient blocks are missing ({missing[:3]}...); re-run "
                          "`llm-attr gradients` with the same arguments to compute them")
    return manifest


def train_chunks(store: Store, checkpoint: int = 0, dtype: torch.dtype = torch.float32,
                 max_elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """The stored training gradients at `checkpoint` in row order, as `[n_c, d]` chunks in `dtype` of at most
    `max_elements` elements (at least one row), read lazily from the block shards: memory is bounded for any N, d."""
    manifest = store.manifest
    d = manifest["shapes"]["train_gradients"][1]
    rows = max(1, max_elements // max(d, 1))
    for b, (start, stop) in enumerate(block_ranges(len(manifest["ids"]["train"]), manifest["block_size"])):
        name = gradient_shard("train", checkpoint, b)
        for s in range(0, stop - start, rows):
            yield store.read_slice(name, "gradients", s, min(s + rows, stop - start)).to(dtype)


def query_gradients(store: Store, checkpoint: int = 0) -> torch.Tensor:
    """`[n_query, d]` float32: all stored query gradients at `checkpoint`."""
    manifest = store.manifest
    blocks = block_ranges(len(manifest["ids"]["query"]), manifest["block_size"])
    return torch.cat([store.read_shard(gradient_shard("query", checkpoint, b))["gradients"].float()
                      for b in range(len(blocks))])


def merged_factors(store: Store) -> KroneckerFactors:
    """The K-FAC statistics of all training blocks (checkpoint 0), summed in block order."""
    manifest = store.manifest
    factors = KroneckerFactors()
    for b in range(len(block_ranges(len(manifest["ids"]["train"]), manifest["block_size"]))):
        name = gradient_shard("train", 0, b)
        if not _has_factors(store, name):
            raise RunDirError(f"{store.root}: block {name} holds no K-FAC statistics; re-run `llm-attr gradients` "
                              "with --set method=if-kfac (or if-ekfac) to add them")
        factors.merge(KroneckerFactors.from_state_dict(_read_statistics(store, name)))
    return factors


def _train_digest(store: Store) -> str:
    """Fingerprint of the training gradient shards (checkpoint 0): what a fitted preconditioner depends on."""
    manifest = store.manifest
    n_blocks = len(block_ranges(len(manifest["ids"]["train"]), manifest["block_size"]))
    return fingerprint([store.shard_info(gradient_shard("train", 0, b))["sha256"] for b in range(n_blocks)])


def fit_preconditioner(store: Store, method: str | None = None, damping: float | None = None,
                       relative_damping: float | None = None) -> Preconditioner:
    """The store's preconditioner for `method` (default: the run's), read from the `preconditioner` shard when it was
    fitted with the same method and damping, else fitted on the training gradients and written there."""
    manifest = _check_complete(store)
    cfg = manifest["config"]
    method = method or cfg["method"]
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: expected one of {list(METHODS)}")
    damping = cfg["damping"] if damping is None else damping
    relative_damping = cfg["relative_damping"] if relative_damping is None else relative_damping
    meta = {"method": method, "damping": damping, "relative_damping": relative_damping,
            "train_shards": _train_digest(store)}
    if method in ("grad-dot", "tracin"):
        return Preconditioner()
    if method == "grad-cos":
        return Cosine()
    blocks = _layer_blocks(manifest)
    if method == "if-fisher":
        precond: Preconditioner = DampedFisher(damping, relative_damping)
    elif method == "if-kfac":
        precond = KFAC(blocks, damping, relative_damping)
    else:
        precond = EKFAC(blocks, damping, relative_damping)
    info = store.shard_info("preconditioner")
    if info is not None and info["meta"] == meta and not store.missing(["preconditioner"]):
        precond.load_state_dict(store.read_shard("preconditioner"))
        return precond
    t0 = time.time()
    d = manifest["shapes"]["train_gradients"][1]
    if method == "if-fisher":
        dtype = torch.float64 if d <= FISHER_FLOAT64_MAX_DIM else torch.float32
        precond.fit(train_chunks(store, 0, dtype))
    else:
        factors = merged_factors(store)
        if method == "if-kfac":
            precond.fit(factors)
        else:
            precond.fit(factors, train_chunks(store, 0, torch.float64))
    store.write_shard("preconditioner", precond.state_dict(), meta=meta)
    logger.info("%s: fitted in %.1fs", method, time.time() - t0)
    return precond


def _train_texts(run: Path, indices: set[int]) -> dict[int, str]:
    """`prompt → response` of the training records at `indices` (RUN/train.jsonl, read line by line)."""
    out: dict[int, str] = {}
    path = run / "train.jsonl"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i in indices and line.strip():
                    out[i] = record_text(json.loads(line))
    return out


def write_scores(out: Path, run: Path, store: Store, method: str, damping: float | None,
                 query: list[torch.Tensor], query_ids: list[str], top_k: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Score query gradients (`query[c]`: `[Q, d]` at checkpoint c) against the store's training gradients into
    `out`: scores.safetensors (float32 `[Q, N]`), ids.json, topk.md, scores.json. Returns figures and a text table."""
    manifest = store.manifest
    t0 = time.time()
    precond = fit_preconditioner(store, method, damping)
    checkpoints = manifest.get("checkpoints") or [None]
    if method == "tracin" and len(checkpoints) > 1:
        # Σ_c lr_c g_q(c)ᵀ g_j(c): one inner product of the checkpoints' gradients side by side
        lrs = [c["lr"] for c in checkpoints]
        q = torch.cat([lr * g.double() for g, lr in zip(query, lrs, strict=True)], dim=1)
        chunks = (torch.cat(blocks, dim=1)
                  for blocks in zip(*(train_chunks(store, c, max_elements=SCORE_CHUNK_ELEMENTS // len(lrs))
                                      for c in range(len(lrs))), strict=True))
    else:
        lr = checkpoints[0]["lr"] if method == "tracin" and checkpoints[0] is not None else 1.0
        q = lr * precond.apply(query[0].double())
        chunks = (precond.train_side(chunk) for chunk in train_chunks(store, 0, max_elements=SCORE_CHUNK_ELEMENTS))
    train_ids = manifest["ids"]["train"]
    rank = manifest["config"]["projection_rank"]
    sf = ScoreFile(out / "scores.safetensors", (len(query_ids), len(train_ids)),
                   metadata={"method": method, "projection_rank": rank})
    try:
        score_inner_products(q, chunks, n_train=len(train_ids), out=sf.array)
        values, indices = topk_rows(sf.array, top_k)
    except BaseException:
        sf.abort()
        raise
    sf.commit()
    write_ids(out / "ids.json", query_ids, train_ids)
    texts = _train_texts(run, set(indices.ravel().tolist()))
    title = f"{method} top-{top_k} ({f'projection rank {rank}' if rank else 'exact gradients'})"
    write_topk_table(out / "topk.md", query_ids, train_ids, values, indices, texts.get, title=title)
    info = {"method": method, "projection_rank": rank, "dim": manifest["shapes"]["train_gradients"][1],
            "top_k": top_k, "seconds": round(time.time() - t0, 3), **meta}
    atomic_write_json(out / "scores.json", info)
    logger.info("wrote %s [%d x %d] and %s", out / "scores.safetensors", len(query_ids), len(train_ids),
                out / "topk.md")
    info["table"] = format_topk(query_ids, train_ids, values, indices, texts.get)
    return info


@locked("gradient scoring", dir_arg="run")
def score_run(run: str | Path, *, method: str | None = None, damping: float | None = None,
              top_k: int = 10) -> dict[str, Any]:
    """Score a gradient run's queries from its store: RUN/scores.safetensors, ids.json, topk.md, scores.json.

    `method`: another scoring method over the same gradients (grad-dot, grad-cos, if-fisher always; if-kfac and
    if-ekfac when the store holds K-FAC statistics; tracin sums over the store's checkpoints). Returns the figures
    and a text table.
    """
    run = Path(run)
    store = Store.open(run, METHOD)
    manifest = _check_complete(store)
    query = [query_gradients(store, c) for c in range(len(manifest.get("checkpoints") or [None]))]
    return write_scores(run, run, store, method or manifest["config"]["method"], damping, query,
                        manifest["ids"]["query"], top_k, {"run": str(run)})


@locked("gradient query")
def query_run(run: str | Path, query: str | Path | list, out: str | Path, *, method: str | None = None,
              damping: float | None = None, top_k: int = 10, batch_size: int | None = None) -> dict[str, Any]:
    """Score new queries against a gradient run (its stored training gradients, projection and preconditioner):
    only the queries' gradients are computed. Writes OUT/scores.safetensors, ids.json, topk.md, scores.json,
    query.jsonl and query_gradients.safetensors (`c<C>`: `[Q, d]` float32 per checkpoint)."""
    from safetensors.torch import save_file

    from ..config import from_dict
    from ..io import atomic_write
    from ..models.loading import auto_device

    run, out = Path(run), Path(out)
    store = Store.open(run, METHOD)
    manifest = _check_complete(store)
    cfg = from_dict(GradientConfig, manifest["config"], where=f"{run}/manifest.json config")
    if batch_size:
        cfg.batch_size = batch_size
    spec = manifest["model"]["spec"]
    try:
        same_model = model_fingerprint(spec) == manifest["model"]["fingerprint"]
    except Exception:
        same_model = False
    if not same_model:
        raise RunDirError(f"{run}: the model {spec} is not available or has changed since this store was built "
                          "(fingerprint differs); `llm-attr query` needs the very same model")
    method_obj = GradientAttribution(cfg)
    net, tokenizer = method_obj._load(spec, auto_device())
    extractor = GradientExtractor(net, cfg.params, cfg.projection_rank, cfg.projection, cfg.seed)
    if cfg.projection_rank:
        extractor.load_state_dict(store.read_shard("projection"))
    if extractor.dim != manifest["shapes"]["train_gradients"][1]:
        raise RunDirError(f"{run}: the model's gradients have d = {extractor.dim}, the store's {manifest['shapes']}")
    records = as_records(query)
    examples, _ = tokenize_records(records, tokenizer, cfg.max_length, source="query")
    pad_id = pad_id_of(tokenizer)
    grads = []
    for checkpoint in cfg.effective_checkpoints():
        if checkpoint is not None:
            _load_checkpoint(net, checkpoint)
        grads.append(method_obj.block_gradients(extractor, examples, pad_id)[0])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "query_gradients.safetensors",
                 lambda tmp: save_file({f"c{c}": g for c, g in enumerate(grads)}, tmp))
    save_jsonl(records, out / "query.jsonl")
    return write_scores(out, run, store, method or cfg.method, damping, grads, [r.id for r in records], top_k,
                        {"run": str(run), "query": str(query) if isinstance(query, (str, Path)) else "records"})
