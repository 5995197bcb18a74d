"""GradientAttribution: Grad-Dot, Grad-Cos, TracIn and influence (damped Fisher, K-FAC, EK-FAC) through the store.

Featurize: per-example (LoGra-projected) gradients of every training and query example (`GradientExtractor`),
written in blocks of `block_size` examples, one shard per block (`gradients [n, d]` in `store_dtype`, `losses [n]`
float32, and the block's K-FAC statistics when the method needs them). Under `accelerate launch` process r computes
the blocks r, r + P, ... of one list; K-FAC statistics are merged in block order, so the result does not depend on P.
Fit and score (`gradient_store`, which also documents the store's shards): the main process fits the
preconditioner on the stored training gradients and streams the training blocks against the preconditioned query
gradients. This module owns the config, the featurize phase and `query_run` (new queries' gradients only).

See docs/design.md (Projected gradients); the sign convention (positive: the training example helps the query) is the package's.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import pipeline
from ..config import at_least, to_dict
from ..data import spans
from ..data.records import as_records, save_jsonl
from ..data.tokenize import Example, collate, pad_id_of, token_lengths, tokenize_records
from ..errors import ConfigError, RunDirError
from ..fingerprints import model_fingerprint
from ..io import file_fingerprint, locked
from ..results import AttributionResult
from ..scoring import scores_line
from ..store import Store, input_copy
from ..utils import Overall
from .gradient_store import (  # noqa: F401 (the store's names, also imported from here)
    FACTOR_METHODS,
    METHOD,
    METHODS,
    _check_complete,
    _has_factors,
    block_ranges,
    expected_shards,
    fit_preconditioner,
    gradient_shard,
    merged_factors,
    pca_shard,
    query_gradients,
    score_cli,
    score_run,
    train_chunks,
    write_scores,
)
from .gradients import GradientExtractor, KroneckerFactors, effective_params
from .registry import PRECONDITIONERS

logger = logging.getLogger(__name__)

#: Files a run writes beside its store (deleted with it by --overwrite); train/query.jsonl: copies of runs made
#: before the copies moved to inputs/.
RUN_OUTPUTS = ("scores.safetensors", "ids.json", "topk.md", "scores.json", "train.jsonl", "query.jsonl")
GradientMethod = Literal[tuple(PRECONDITIONERS)]  # type: ignore[valid-type]  (the registry's names)
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    params: str = field(default="lora", metadata={"help": "lora (the target's adapter; on a merged or fully "
                        "fine-tuned model: adapted) | adapted (the linear weights LoRA would adapt) | a module-name regex"})
    store_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the stored gradients"}
    )
    batch_size: int = field(default=16, metadata={"help": "examples per forward/backward pass"})
    block_size: int = field(default=256, metadata={"help": "examples per shard (the unit of resume and of parallel work)"})
    seed: int = field(default=0, metadata={"help": "seed of the Gaussian projections"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (longer ones are truncated)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto | float32 | bfloat16 | float16"})
    query_span: str = field(default=spans.RESPONSE, metadata={"help": "the query gradients': " + spans.HELP})
    checkpoints: list[Checkpoint] = field(
        default_factory=list, metadata={"help": "tracin: [{adapter: DIR, lr: float}, ...]; empty: the target, lr 1"}
    )

    def __post_init__(self) -> None:
        if self.projection_rank < 0:
            raise ValueError(f"projection_rank must be >= 0 (0: exact gradients), got {self.projection_rank}")
        at_least(self, batch_size=1, block_size=1)
        if self.damping is not None and not self.damping >= 0:
            raise ValueError(f"damping must be >= 0 or null, got {self.damping}")
        if not self.relative_damping > 0:
            raise ValueError(f"relative_damping must be > 0, got {self.relative_damping}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        spans.check_span(self.query_span)
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


def _adapter_file(adapter: str | Path) -> Path:
    """The `adapter_model.safetensors` of any form `models.loading.detect_model` reads as an adapter: a peft adapter
    folder, a Trainer/TRL `checkpoint-N` (or an output folder: its last checkpoint), a run directory."""
    from ..models.loading import adapter_of

    p = Path(adapter)
    for candidate in (p / "adapter_model.safetensors", p / "adapter" / "adapter_model.safetensors"):
        if candidate.is_file():
            return candidate
    found = adapter_of(p)
    if found is not None and (found[1] / "adapter_model.safetensors").is_file():
        return found[1] / "adapter_model.safetensors"
    raise ConfigError(f"checkpoint {adapter}: no LoRA adapter there; pass a peft adapter folder (adapter_config.json + "
                      "adapter_model.safetensors), a Trainer checkpoint-N holding one, or a run directory")


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
    if not spans.is_whole(cfg.query_span):  # (absent for the whole response: older stores keep their fingerprint)
        out["query_span"] = cfg.query_span
    checkpoints = cfg.effective_checkpoints()
    if checkpoints != [None]:
        out["checkpoints"] = [file_fingerprint(_adapter_file(c.adapter)) for c in checkpoints]
    return out


# ---------------------------------------------------------------------- the method


class GradientAttribution(pipeline.FeaturizeMethod, name="gradients", config_class=GradientConfig):
    """`GradientAttribution(config).run(model, train, query, out)`: gradients -> store -> preconditioner -> scores.

    Work items: blocks of `block_size` training or query examples per checkpoint, one shard each; a fine-tuned run
    dir as model keeps its adapter for `params: lora`, another model needs a `params` pattern.
    """

    def _run(self, model, train_records, query_records, out: Path, *, overwrite: bool, score: bool,
             top_k: int) -> AttributionResult:
        cfg, state = self.config, self.context
        model, spec, model_fp = pipeline.model_identity(model)
        fp, parts = pipeline.run_fingerprint(METHOD, model_fp, train_records, query_records, featurize_config(cfg),
                                    config_key="featurize")
        header = {
            "config": to_dict(cfg),
            "model": {"spec": spec, "fingerprint": model_fp},
            "ids": {"train": [r.id for r in train_records], "query": [r.id for r in query_records]},
            "dtype": cfg.store_dtype,
            "block_size": cfg.block_size,
            "measurement": {"query_span": cfg.query_span, "per_token": False},
        }
        store = pipeline.open_store(out, method=METHOD, fingerprint=fp, parts=parts, header=header, state=state,
                           inputs=self.inputs, train=train_records,
                           query=query_records, overwrite=overwrite, outputs=RUN_OUTPUTS)

        net, tokenizer = self._load(model, state.device)
        extractor = GradientExtractor(net, effective_params(cfg.params, net, model), cfg.projection_rank,
                                      cfg.projection, cfg.seed)
        pad_id = pad_id_of(tokenizer)
        train_ex, _ = tokenize_records(train_records, tokenizer, cfg.max_length, source="train")
        query_ex, _ = tokenize_records(query_records, tokenizer, cfg.max_length, source="query")
        given = self.inputs.get("query")
        query_ex = spans.span_examples(query_records, query_ex, tokenizer, cfg.query_span,
                                       str(given) if isinstance(given, (str, Path)) else "query")
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
        self.scores = None
        if pipeline.finish(store, expected_shards(store.manifest), state, "gradient blocks") is not None:
            fit_preconditioner(store)
            if score:
                self.scores = score_run(out, top_k=top_k)
        state.wait_for_everyone()
        return AttributionResult(out)  # a path too: `out / 'topk.md'` still works

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
        logger.info("process %d/%d: %s", state.process_index, state.num_processes,
                    pipeline.work_summary("gradient blocks", len(todo), len(mine), len(work)))
        if not todo:
            return
        restore = _adapter_state(extractor.model) if checkpoints != [None] else None
        overall = Overall(len(mine), "gradient block", done=len(mine) - len(todo), log=logger)
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
                logger.debug("%s: %d examples in %.1fs", name, stop - start, seconds)
                overall.update()
                self._shard_done(name)
        finally:
            overall.close()
            if restore is not None:
                _set_adapter_state(extractor.model, restore)

    def _shard_done(self, name: str) -> None:
        self.computed.append(name)
        self._on_shard_written(name)


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


@locked("gradient query")
def query_run(run: str | Path, query: str | Path | list, out: str | Path, *, method: str | None = None,
              damping: float | None = None, top_k: int = 10, batch_size: int | None = None,
              query_span: str | None = None, per_token: bool = False) -> dict[str, Any]:
    """Score new queries against a gradient run (its stored training gradients, projection and preconditioner):
    only the queries' gradients are computed. Writes OUT/scores.safetensors, ids.json, topk.md, scores.json,
    query.jsonl and query_gradients.safetensors (`c<C>`: `[Q, d]` float32 per checkpoint).

    `query_span`: the queries' measurement (default: the run's). `per_token`: one gradient per response token of
    the span (its token's NLL), projected like the others and computed `batch_size` tokens at a time: the scores
    have one row per token, ids `QUERY#T` (T the token's position in the response)."""
    from safetensors.torch import save_file

    from ..config import from_dict
    from ..io import atomic_write
    from ..models.loading import auto_device

    run, out = Path(run), Path(out)
    pipeline.check_out(out, "query", {"run": run, "query": query}, resumable=pipeline.QUERY_OUTPUTS)
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
    extractor = GradientExtractor(net, effective_params(cfg.params, net, spec), cfg.projection_rank, cfg.projection,
                                  cfg.seed)
    if cfg.projection_rank:
        extractor.load_state_dict(store.read_shard("projection"))
    if extractor.dim != manifest["shapes"]["train_gradients"][1]:
        raise RunDirError(f"{run}: the model's gradients have d = {extractor.dim}, the store's {manifest['shapes']}")
    records = as_records(query)
    examples, _ = tokenize_records(records, tokenizer, cfg.max_length, source="query")
    query_span = query_span or cfg.query_span
    source = str(query) if isinstance(query, (str, Path)) else "query"
    ids = [r.id for r in records]
    if per_token:
        examples, ids = token_examples(records, examples, tokenizer, query_span, source)
    else:
        examples = spans.span_examples(records, examples, tokenizer, query_span, source)
    pad_id = pad_id_of(tokenizer)
    grads = []
    for checkpoint in cfg.effective_checkpoints():
        if checkpoint is not None:
            _load_checkpoint(net, checkpoint)
        grads.append(method_obj.block_gradients(extractor, examples, pad_id)[0])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "query_gradients.safetensors",
                 lambda tmp: save_file({f"c{c}": g for c, g in enumerate(grads)}, tmp))
    save_jsonl(records, input_copy(out, "query"))
    return write_scores(out, run, store, method or cfg.method, damping, grads, ids, top_k,
                        {"run": str(run), "query": str(query) if isinstance(query, (str, Path)) else "records"},
                        query_span=query_span, per_token=per_token)


def token_examples(records, examples, tokenizer, query_span: str | None, source: str) -> tuple[list[Example], list[str]]:
    """One example per response token of each query's span (labels on that token only) and its id `QUERY#T`."""
    chars = spans.query_token_chars(records, examples, tokenizer)
    masks = spans.span_masks(records, chars, query_span or spans.RESPONSE, source)
    out, ids = [], []
    for e, mask in zip(examples, masks, strict=True):
        for t in mask.nonzero()[0].tolist():
            one = mask & False
            one[t] = True
            out += spans.masked_examples([e], [one])
            ids.append(f"{e.id}#{t}")
    return out, ids


def query_cli(run: str | Path, query: str | Path, out: str | Path, *, top_k: int = 10, method: str | None = None,
              damping: float | None = None, query_span: str | None = None, per_token: bool = False) -> dict[str, Any]:
    """`llm-attr query RUN --query Q --out OUT [--query-span S] [--per-token]` of a gradient store (`query_run`)."""
    return {**query_run(run, query, out, method=method, damping=damping, top_k=top_k, query_span=query_span,
                        per_token=per_token), "files": scores_line(out)}
