"""Further training from the final model: the final-model-only gold standard of attribution (docs/design.md).

From the final model θ_f, for S seeds and J left-out training examples, train once with all the data and once
without example j (same seed: same data order, LoRA init and dropout), recording every query's loss at a grid of
step budgets in the same run. The reference score is the seed-averaged paired difference

    τ(j → z) = (1/S) Σ_s [ ℓ(z; θ^{s,t}_{−j}) − ℓ(z; θ^{s,t}) ]      (positive: j helps z)

Leaving j out is `exclude` (j's term is zeroed in every batch it falls in; every other example keeps its place in
the data order) or `reweight` (j stays in the data and every batch adds −ℓ_j/N, the removal of j from the mean
objective). One store shard per (seed, j) run, `s{seed}_full` for the full-data run, split over accelerate
processes (process r takes runs r, r+P, ...) and resumable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .. import pipeline
from ..config import to_dict
from ..data import spans
from ..data.records import Record
from ..data.tokenize import Example, collate, pad_id_of, tokenize_records
from ..errors import ConfigError
from ..io import atomic_write_json
from ..losses import evaluate_signal, forward_logits, per_example_loss
from ..models.lora import LoraArgs
from ..scoring import write_ids
from ..store import Store
from ..training import TrainingArgs, train
from ..utils import Overall

logger = logging.getLogger(__name__)

#: Files a run writes beside its store (deleted with it by --overwrite); train/query.jsonl: copies of runs made
#: before the copies moved to inputs/.
RUN_OUTPUTS = ("reference.safetensors", "scores.safetensors", "ids.json", "scores.json", "train.jsonl", "query.jsonl")
METHOD = "further-training"
#: Config keys that do not change the shards (not fingerprinted).
SHARD_NEUTRAL_KEYS = ("centre", "eval_batch_size")


@dataclass
class FurtherTrainingConfig(TrainingArgs):
    """`configs/further_training.yaml`: the runs (seeds x left-out examples), their budgets and optimiser."""

    epochs: float = field(default=1.0, metadata={"help": "unused: max_steps is set to the largest budget"})
    max_steps: int = 40
    learning_rate: float = 1e-2  # its help (and batch_size's) is TrainingArgs'
    batch_size: int = 8
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps with a linear warm-up (0: none, the runs are short)"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "no clipping: the paired difference stays first-order in the removal"})
    seeds: int = field(default=2, metadata={"help": "S: paired runs per left-out example"})
    leave_out: int = field(default=8, metadata={"help": "J: training examples left out, drawn at random from `seed` (0: every example)"})
    leave_out_ids: list[str] | None = field(default=None, metadata={"help": "explicit ids to leave out (overrides leave_out)"})
    budgets: list[int] = field(default_factory=lambda: [10, 20, 40], metadata={"help": "steps at which query losses are recorded"})
    removal: Literal["exclude", "reweight"] = field(default="exclude", metadata={"help": "exclude: drop the left-out example from the batches; reweight: give it weight 0"})
    optimizer: Literal["sgd", "adamw"] = field(default="sgd", metadata={"help": "optimiser of the further-training runs"})
    scheduler: Literal["constant", "cosine"] = field(default="constant", metadata={"help": "learning-rate schedule of the further-training runs"})
    adapter: Literal["new", "continue"] = field(default="new", metadata={"help": "new: fresh zero-init LoRA on the merged final model"})
    lora: LoraArgs = field(default_factory=LoraArgs, metadata={"help": "the adapter trained on the final model (adapter: new)"})
    centre: bool = field(default=False, metadata={"help": "subtract each query's mean over the left-out examples"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of the query-loss evaluation"})
    query_span: str = field(default=spans.RESPONSE, metadata={"help": "the query losses': " + spans.HELP})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})

    def __post_init__(self) -> None:
        if not self.budgets or any(b < 1 for b in self.budgets) or sorted(set(self.budgets)) != self.budgets:
            raise ValueError(f"budgets must be increasing step counts >= 1, got {self.budgets}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.leave_out < 0:
            raise ValueError(f"leave_out must be >= 0, got {self.leave_out}")
        self.max_steps = self.budgets[-1]
        spans.check_span(self.query_span)
        super().__post_init__()


def shard_name(seed: int, position: int | None) -> str:
    """`s{seed}_full` (all the data) or `s{seed}_j{position}` (training example at `position` left out)."""
    return f"s{seed}_full" if position is None else f"s{seed}_j{position}"


def run_seeds(base_seed: int, s: int) -> tuple[int, int]:
    """(data-order seed, LoRA-init/dropout seed) of paired seed `s`: the same for the full run and every j."""
    return 1_000_003 * base_seed + 2 * s, 1_000_003 * base_seed + 2 * s + 1


def left_out_positions(cfg: FurtherTrainingConfig, train_ids: list[str]) -> list[int]:
    """Sorted training positions left out: `leave_out_ids`, else `leave_out` drawn from `seed` (0: all)."""
    if cfg.leave_out_ids:
        where = {rid: i for i, rid in enumerate(train_ids)}
        unknown = [r for r in cfg.leave_out_ids if r not in where]
        if unknown:
            raise ConfigError(f"leave_out_ids: not in the training data: {unknown[:5]}")
        return sorted(where[r] for r in cfg.leave_out_ids)
    n = len(train_ids)
    if cfg.leave_out == 0 or cfg.leave_out >= n:
        return list(range(n))
    rng = np.random.default_rng(cfg.seed)
    return sorted(rng.choice(n, cfg.leave_out, replace=False).tolist())


def reweight_objective(left_out: Example, pad_id: int, n_train: int):
    """Per-example loss `[B]` minus ℓ_j/N: the batch mean then estimates the mean loss of the data without j."""
    batch_j = collate([left_out], pad_id)

    def objective(model, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        values = per_example_loss(logits, batch["labels"].to(logits.device))
        logits_j = forward_logits(model, batch_j)
        loss_j = per_example_loss(logits_j, batch_j["labels"].to(logits_j.device))
        return values - loss_j / n_train

    return objective


def featurize_config(cfg: FurtherTrainingConfig) -> dict[str, Any]:
    """The fingerprinted keys (`query_span` only when it is a span: older stores keep their fingerprint)."""
    return pipeline.shard_config(cfg, SHARD_NEUTRAL_KEYS, {"query_span": spans.RESPONSE})


class FurtherTraining(pipeline.FeaturizeMethod, name="further-train", config_class=FurtherTrainingConfig):
    """`FurtherTraining(config).run(model, train, query, out)`: paired further-training runs -> reference scores.

    Work items: (seed s, left-out position j or None for the full data), one shard of query losses each.
    """

    def _run(self, model, train_records, query_records, out: Path, *, overwrite: bool, score: bool,
             top_k: int) -> Path:
        """Compute this process's missing (seed, j) runs, then the main process writes the reference scores."""
        cfg, state = self.config, self.context
        accelerator = state.accelerator()
        train_ids = [r.id for r in train_records]
        positions = left_out_positions(cfg, train_ids)
        model, spec, model_fp = pipeline.model_identity(model)
        fp, parts = pipeline.run_fingerprint(METHOD, model_fp, train_records, query_records, featurize_config(cfg))
        header = {
            "config": to_dict(cfg),
            "model": {"spec": spec, "fingerprint": model_fp, "adapter": cfg.adapter},
            "ids": {"train": train_ids, "query": [r.id for r in query_records]},
            "left_out": positions,
            "budgets": cfg.budgets,
            "shapes": {"query_loss": [len(cfg.budgets), len(query_records)]},
            "dtype": "float32",
        }
        store = pipeline.open_store(out, method=METHOD, fingerprint=fp, parts=parts, header=header, state=state,
                           inputs=self.inputs, train=train_records,
                           query=query_records, overwrite=overwrite, outputs=RUN_OUTPUTS)
        runs = [(s, j) for s in range(cfg.seeds) for j in [None, *positions]]
        mine = pipeline.my_share(runs, state)
        todo = pipeline.todo(store, mine, lambda r: shard_name(*r))
        logger.info("further training from the final model with and without each of %d left-out examples (%d "
                    "seed(s)), recording the loss of %d queries; process %d/%d: %s", len(positions), cfg.seeds,
                    len(query_records), state.process_index, state.num_processes,
                    pipeline.work_summary("further-training runs", len(todo), len(mine), len(runs)))
        self.computed = []
        if todo:
            self._compute(model, train_records, query_records, store, todo, accelerator)
        if pipeline.finish(store, [shard_name(*r) for r in runs], state, "further-training runs") is not None:
            if score:
                write_reference(out, centre=cfg.centre)
        state.wait_for_everyone()
        return out

    def _compute(self, model: str, train_records: list[Record], query_records: list[Record], store: Store,
                 todo: list[tuple[int, int | None]], accelerator) -> None:
        from ..runner import PerturbationModel, load_target

        cfg = self.config
        net, tokenizer = load_target(model, cfg.adapter, accelerator.device, cfg.dtype)
        pad_id = pad_id_of(tokenizer)
        train_ex, _ = tokenize_records(train_records, tokenizer, cfg.max_length, source="train")
        query_ex, _ = tokenize_records(query_records, tokenizer, cfg.max_length, source="query")
        given = self.inputs.get("query")
        query_ex = spans.span_examples(query_records, query_ex, tokenizer, cfg.query_span,
                                       str(given) if isinstance(given, (str, Path)) else "query")
        pm = PerturbationModel(net, cfg.adapter, cfg.lora)
        n = len(train_ex)
        overall = Overall(len(todo), "further-training run", log=logger)
        for s, j in todo:
            t0 = time.time()
            order_seed, init_seed = run_seeds(cfg.seed, s)
            pm.reset(init_seed)
            recorded: list[torch.Tensor] = []

            def record(step: int, recorded: list[torch.Tensor] = recorded) -> None:
                if step in cfg.budgets:
                    recorded.append(evaluate_signal(pm.model, query_ex, pad_id, batch_size=cfg.eval_batch_size))

            weights, objective = None, None
            if j is not None and cfg.removal == "exclude":
                weights = torch.ones(n)
                weights[j] = 0.0
            elif j is not None:
                objective = reweight_objective(train_ex[j], pad_id, n)
            kwargs = {"objective": objective} if objective is not None else {}
            args = dataclasses.replace(cfg, seed=order_seed)
            result = train(pm.model, train_ex, args, pad_id, accelerator=accelerator, weights=weights,
                           data_parallel=False, optimizer=cfg.optimizer, scheduler=cfg.scheduler, on_step=record,
                           desc=f"further training {shard_name(s, j)}", **kwargs)
            store.write_shard(shard_name(s, j), {"query_loss": torch.stack(recorded)}, meta={
                "seed": s, "left_out": j, "steps": result.steps, "final_loss": result.final_loss,
                "seconds": round(time.time() - t0, 3), "process_index": accelerator.process_index})
            self.computed.append(shard_name(s, j))
            logger.debug("%s: %d steps, final loss %.4g, %.1fs", shard_name(s, j), result.steps, result.final_loss,
                         time.time() - t0)
            overall.update()
        if cfg.adapter == "new":
            pm.model.unload()


def reference_scores(store: Store, centre: bool = False) -> dict[str, Any]:
    """τ from a complete store: `scores [B, Q, J]` (seed mean), `per_seed [S, B, Q, J]` paired differences."""
    manifest = store.manifest
    cfg = manifest["config"]
    positions = manifest["left_out"]
    per_seed = []
    for s in range(cfg["seeds"]):
        full = store.read_shard(shard_name(s, None))["query_loss"].double()  # [B, Q]
        without = torch.stack([store.read_shard(shard_name(s, j))["query_loss"].double() for j in positions], -1)
        per_seed.append(without - full.unsqueeze(-1))  # [B, Q, J]
    diffs = torch.stack(per_seed)
    scores = diffs.mean(0)
    if centre:
        scores = scores - scores.mean(-1, keepdim=True)
    return {"scores": scores.float(), "per_seed": diffs.float(), "budgets": manifest["budgets"],
            "query_ids": manifest["ids"]["query"], "train_ids": [manifest["ids"]["train"][j] for j in positions]}


def write_reference(run: str | Path, centre: bool = False) -> dict[str, Any]:
    """RUN/reference.safetensors (`scores [B, Q, J]`, `per_seed`, `budgets`), and scores.safetensors `[Q, J]` at
    the largest budget with ids.json (train = the left-out ids), so that other commands read it like any method."""
    from safetensors.torch import save_file

    from ..io import atomic_write

    run = Path(run)
    store = Store.open(run, METHOD)
    ref = reference_scores(store, centre=centre)
    span = store.manifest["config"].get("query_span", spans.RESPONSE)
    budgets = torch.tensor(ref["budgets"], dtype=torch.int64)
    atomic_write(run / "reference.safetensors", lambda tmp: save_file(
        {"scores": ref["scores"], "per_seed": ref["per_seed"], "budgets": budgets}, tmp))
    atomic_write(run / "scores.safetensors", lambda tmp: save_file({"scores": ref["scores"][-1].contiguous()}, tmp))
    write_ids(run / "ids.json", ref["query_ids"], ref["train_ids"])
    atomic_write_json(run / "scores.json", {"method": METHOD, "budgets": ref["budgets"], "centre": centre,
                                            "budget": ref["budgets"][-1], "run": str(run),
                                            **({} if spans.is_whole(span) else {"query_span": span})})
    logger.info("wrote %s: τ over %d queries x %d left-out examples at budgets %s", run / "reference.safetensors",
                len(ref["query_ids"]), len(ref["train_ids"]), ref["budgets"])
    return ref


def score_cli(run: str | Path, *, top_k: int = 10) -> dict[str, Any]:
    """`llm-attr score RUN` of a further-training store: the reference scores written again from its shards."""
    from ..io import run_lock

    with run_lock(run, "further-training scoring"):
        centre = Store.open(run, METHOD).manifest["config"].get("centre", False)
        ref = write_reference(run, centre=centre)
    rows = [f"further-training reference: {len(ref['query_ids'])} queries x {len(ref['train_ids'])} left-out "
            f"examples at budgets {ref['budgets']}"]
    return {"table": "\n".join(rows), "files": f"reference: {Path(run) / 'reference.safetensors'}   scores (largest "
            f"budget): {Path(run) / 'scores.safetensors'}"}
