"""Retraining on subsets of the training data: the ground truth of LDS, and the engine of removal studies.

`Retrainer` loads a start model once and re-fits a fresh LoRA adapter on any subset (positions kept):
`start: base` fine-tunes the target's base with the target's own finetune config (RUN/config.yaml);
`start: final` further-trains the merged final model with this config's optimisation settings.
`retrain` runs M random subsets (fraction α, `seeds_per_subset` seeds each) into a store, one shard per
(subset, seed) holding the kept mask and every query's loss; split over accelerate processes and resumable.
With `query_span` the recorded loss is the span's (`data.spans`: the query's labels kept on the span's tokens),
the measurement is in the manifest, and `eval lds` compares it with scores of the same measurement only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .. import pipeline
from ..config import load_config, to_dict
from ..data import spans
from ..data.records import Record, as_records
from ..data.tokenize import pad_id_of, tokenize_records
from ..errors import ConfigError, RunDirError
from ..fingerprints import model_fingerprint
from ..io import locked
from ..losses import autocast, evaluate_signal
from ..models.lora import LoraArgs
from ..models.prefix_cache import prefix_cache
from ..store import Store
from ..training import TrainingArgs, train
from ..utils import Overall

logger = logging.getLogger(__name__)

METHOD = "retrain"
SHARD_NEUTRAL_KEYS = ("eval_batch_size",)


@dataclass
class RetrainConfig(TrainingArgs):
    """`configs/retrain.yaml`. The optimisation fields apply to `start: final`; `start: base` uses the target's."""

    subsets: int = field(default=16, metadata={"help": "M random subsets"})
    fraction: float = field(default=0.5, metadata={"help": "α: fraction of the training examples kept in each subset"})
    seeds_per_subset: int = field(default=1, metadata={"help": "retrains per subset (outcomes averaged)"})
    start: Literal["base", "final"] = field(default="base", metadata={"help": "`--set from=...` is accepted as an alias"})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "optimiser of the retrains (start: final)"})
    scheduler: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "learning-rate schedule of the retrains (start: final)"})
    lora: LoraArgs = field(default_factory=LoraArgs, metadata={"help": "start: final only (start: base uses the target's)"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of the query-loss evaluation"})
    query_span: str = field(default=spans.RESPONSE, metadata={"help": "the recorded query losses': " + spans.HELP})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})

    def __post_init__(self) -> None:
        super().__post_init__()
        spans.check_span(self.query_span)
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if self.subsets < 2:
            raise ValueError(f"subsets must be >= 2 (a correlation over subsets), got {self.subsets}")


def alias_overrides(overrides: list[str] | None) -> list[str]:
    """`from=final` -> `start=final` (`from` is a Python keyword, so the field is `start`)."""
    return [("start=" + o[5:]) if o.startswith("from=") else o for o in overrides or []]


def subset_mask(seed: int, m: int, n: int, fraction: float) -> torch.Tensor:
    """`[n]` bool: exactly round(fraction * n) examples kept, drawn from (seed, m)."""
    rng = np.random.default_rng([seed, m])
    keep = rng.choice(n, max(1, round(fraction * n)), replace=False)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(keep)] = True
    return mask


def shard_name(m: int, s: int) -> str:
    return f"subset_{m}_s{s}"


def featurize_config(cfg: RetrainConfig) -> dict[str, Any]:
    """The fingerprinted keys (`query_span` only when it is a span: older stores keep their fingerprint)."""
    return pipeline.shard_config(cfg, SHARD_NEUTRAL_KEYS, {"query_span": spans.RESPONSE})


class Retrainer:
    """A start model loaded once; `fit(positions, seed)` re-fits a fresh LoRA on those training positions.

    `target`: the fine-tuned run directory. `start: base` loads its base and uses its RUN/config.yaml.
    """

    def __init__(self, target: str, train_records: list[Record], start: Literal["base", "final"],
                 args: TrainingArgs, lora: LoraArgs, *, optimizer: str = "adamw", scheduler: str = "cosine",
                 dtype: str = "auto", device=None):
        from ..finetune import FinetuneConfig
        from ..models.loading import is_run_dir, run_base
        from ..runner import PerturbationModel, load_target

        if start == "base":
            if not is_run_dir(target):
                raise ConfigError(f"start: base needs the target's run directory (adapter/ and config.yaml), "
                                  f"got {target}")
            ft = load_config(FinetuneConfig, Path(target) / "config.yaml")
            args, lora, optimizer, scheduler = ft, ft.lora, "adamw", "cosine"
            spec = run_base(target)
        else:
            spec = target
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net, self.tokenizer = load_target(spec, "new", device, dtype)
        self.pad_id = pad_id_of(self.tokenizer)
        self.examples, _ = tokenize_records(train_records, self.tokenizer, args.max_length, source="train")
        self.pm = PerturbationModel(net, "new", lora)
        self.args, self.optimizer, self.scheduler = args, optimizer, scheduler
        # with `lora.layers` the bottom layers are frozen: computed once for every retrain (models.prefix_cache)
        self._autocast = functools.partial(autocast, getattr(args, "precision", "fp32"), device)
        self._stack = contextlib.ExitStack()
        self.cache = self._stack.enter_context(prefix_cache(self.pm.model, self.examples, self.pad_id,
                                                            batch_size=args.batch_size, autocast=self._autocast))

    def close(self) -> None:
        """Leave the prefix cache (the model runs whole again)."""
        self._stack.close()

    @property
    def model(self):
        return self.pm.model

    def fit(self, positions: list[int], seed: int, accelerator=None, desc: str = "retraining") -> float:
        """Train a fresh adapter (init and data order from `seed`) on `positions`; returns the final loss."""
        self.pm.reset(seed)
        args = dataclasses.replace(self.args, seed=seed)
        result = train(self.pm.model, self.examples, args, self.pad_id, accelerator=accelerator, subset=positions,
                       data_parallel=False, optimizer=self.optimizer, scheduler=self.scheduler, desc=desc)
        return result.final_loss

    def query_examples(self, records: list[Record], query_span: str | None = None, source: str = "query"):
        """`records` tokenized, labelled on measurement `query_span` (`data.spans.span_examples`; the whole
        response by default). `DataError` naming the record when a query has no span."""
        examples, _ = tokenize_records(records, self.tokenizer, self.args.max_length, source=source)
        return spans.span_examples(records, examples, self.tokenizer, query_span, source)

    def losses(self, records: list[Record], batch_size: int = 64, query_span: str | None = None) -> torch.Tensor:
        """`[len(records)]` float32: mean NLL of each record's response (or its `query_span`: the span's tokens
        only) under the current model."""
        examples = self.query_examples(records, query_span)
        if self.cache is not None:
            self.cache.add(self.cache.missing(examples), self.pad_id, batch_size=batch_size, autocast=self._autocast)
        return evaluate_signal(self.pm.model, examples, self.pad_id, batch_size=batch_size)


@locked("retrain")
def retrain(target: str, train: str | Path | list, query: str | Path | list, out: str | Path,
            config: RetrainConfig | None = None, *, overwrite: bool = False) -> Path:
    """Retrain on M random subsets (x seeds) and record each query's loss: the LDS ground truth store `out`."""
    from ..context import run_context
    from ..models.loading import canonical_spec

    cfg = config or RetrainConfig()
    state = run_context()
    accelerator = state.accelerator()
    out = Path(out)
    train_records, query_records = as_records(train), as_records(query)
    model_fp = model_fingerprint(target)
    fp, parts = pipeline.run_fingerprint(METHOD, model_fp, train_records, query_records, featurize_config(cfg))
    header = {"config": to_dict(cfg), "model": {"spec": canonical_spec(target), "fingerprint": model_fp},
              "ids": {"train": [r.id for r in train_records], "query": [r.id for r in query_records]},
              "shapes": {"query_loss": [len(query_records)], "mask": [len(train_records)]}, "dtype": "float32",
              "measurement": {"query_span": cfg.query_span, "per_token": False}}
    store = pipeline.open_store(out, method=METHOD, fingerprint=fp, parts=parts, header=header, state=state,
                       inputs={"train": train, "query": query, "model": target}, train=train_records,
                       query=query_records, overwrite=overwrite, outputs=("train.jsonl", "query.jsonl"))
    runs = [(m, s) for m in range(cfg.subsets) for s in range(cfg.seeds_per_subset)]
    todo = pipeline.todo(store, pipeline.my_share(runs, state), lambda r: shard_name(*r))
    logger.info("retraining on random %g-fractions of the %d training examples (%s start) and recording the loss of "
                "%d queries%s; process %d/%d: %s", cfg.fraction, len(train_records), cfg.start, len(query_records),
                "" if spans.is_whole(cfg.query_span) else f" on --query-span {cfg.query_span!r}",
                state.process_index, state.num_processes,
                pipeline.work_summary("retrains", len(todo), len(pipeline.my_share(runs, state)), len(runs)))
    if todo:
        retrainer = Retrainer(target, train_records, cfg.start, cfg, cfg.lora, optimizer=cfg.optimizer,
                              scheduler=cfg.scheduler, dtype=cfg.dtype, device=accelerator.device)
        source = str(query) if isinstance(query, (str, Path)) else "query"
        retrainer.query_examples(query_records, cfg.query_span, source)  # a query without its span stops here
        n = len(train_records)
        overall = Overall(len(runs), "retrain", done=len(runs) - len(todo), log=logger)
        for m, s in todo:
            t0 = time.time()
            mask = subset_mask(cfg.seed, m, n, cfg.fraction)
            final = retrainer.fit(mask.nonzero().squeeze(1).tolist(), seed=1_000_003 * cfg.seed + 1000 * m + s,
                                  accelerator=accelerator, desc=f"retrain {shard_name(m, s)}")
            losses = retrainer.losses(query_records, cfg.eval_batch_size, query_span=cfg.query_span)
            store.write_shard(shard_name(m, s), {"query_loss": losses, "mask": mask},
                              meta={"subset": m, "seed": s, "final_loss": final, "seconds": round(time.time() - t0, 3)})
            logger.debug("%s: final loss %.4g, mean query loss %.4g, %.1fs", shard_name(m, s), final,
                         losses.mean().item(), time.time() - t0)
            overall.update()
        overall.close()
    pipeline.finish(store, [shard_name(*r) for r in runs], state, "retrains")
    state.wait_for_everyone()
    return out


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """`masks [M, N]` bool and `outcomes [M, Q]` float64 (query loss, mean over the seeds of each subset), ids,
    and `query_span`: the measurement of the losses (`response` for the whole response, and for older stores)."""
    store = Store.open(path, METHOD)
    manifest = store.manifest
    if not manifest.get("complete"):
        raise RunDirError(f"{path}: the retrain store is incomplete; re-run `llm-attr retrain`")
    cfg = manifest["config"]
    masks, outcomes = [], []
    for m in range(cfg["subsets"]):
        shards = [store.read_shard(shard_name(m, s)) for s in range(cfg["seeds_per_subset"])]
        masks.append(shards[0]["mask"].numpy())
        outcomes.append(torch.stack([sh["query_loss"].double() for sh in shards]).mean(0).numpy())
    return {"masks": np.stack(masks), "outcomes": np.stack(outcomes), "query_ids": manifest["ids"]["query"],
            "train_ids": manifest["ids"]["train"], "query_span": cfg.get("query_span") or spans.RESPONSE}
