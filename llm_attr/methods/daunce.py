"""Daunce: attribution by the covariance of per-example signals over K randomly perturbed fine-tunes of the target.

For each perturbation k (everything random drawn from `(seed, k)`): a subset D_k of the training set, weights
ξ ~ U(0, 1) and a LoRA adapter on top of θ₀ (the target) trained briefly on

    γ·(ℓ_i(θ) − ℓ_i(θ₀)) − w_i ⟨f_θ(x_i) − f_θ₀(x_i), ∂ℓ_i/∂f |θ₀⟩,   w_i = 1 + ρ(2ξ_i − 1)

(f: logits; the first-order term is computed in logit space over response tokens, in token chunks), or with
`first_order: false` the plain loss on D_k (black-box Daunce). Then every training and query example's loss and
margin under θ_k is one shard of the store; scores are the covariance (or correlation) over k.
See docs/design.md (Daunce).

Running it (a killed run resumes when re-run with the same arguments; the K perturbations split over processes):

    llm-attr daunce --model RUN_DIR --train train.jsonl --query query.jsonl --out OUT [--set perturbations=32]
    accelerate launch --num_processes 8 -m llm_attr daunce ...                      # 8 GPUs
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m llm_attr daunce ...                                  # 2 CPU processes
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip HOST --main_process_port 29500 \
        --num_processes 16 -m llm_attr daunce ...                                   # 2 nodes x 8 GPUs, OUT shared
    llm-attr score OUT --measure cov --signal loss      # rescore from the stored rows, no training
    llm-attr score OUT --self                           # self-influence: variance over k per training example
    llm-attr query OUT --query new.jsonl --out Q        # new queries: K forward passes with the kept adapters
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .. import pipeline
from ..config import at_least, to_dict
from ..data.records import Record
from ..data.tokenize import IGNORE_INDEX, Example, pad_id_of, token_lengths, tokenize_records
from ..losses import autocast, evaluate_signal, forward_logits
from ..models.lora import LoraArgs
from ..models.prefix_cache import prefix_cache
from ..results import AttributionResult
from ..runner import PerturbationModel, load_target, swapped_weights  # noqa: F401 (also imported from here)
from ..store import Store
from ..training import TrainingArgs, plain_objective, train
from ..utils import Overall
from .daunce_store import (  # noqa: F401 (the store's names, also imported from here)
    METHOD,
    SIGNALS,
    adapter_dir,
    query_cli,
    query_run,
    score_cli,
    score_run,
    score_self_influence,
    shard_name,
)

logger = logging.getLogger(__name__)

#: fp32 elements of one chunk of logit rows in the first-order term (16 MiB): rows per chunk = this // vocab.
LOGIT_CHUNK_ELEMENTS = 1 << 22
#: Files a run writes beside its store (deleted with it by --overwrite).
RUN_OUTPUTS = ("scores.safetensors", "ids.json", "topk.md", "scores.json", "self_influence.safetensors",
               "self_influence.md", "prepared", "train.jsonl", "query.jsonl")
#: Config keys that change how a run is computed or scored but not its shards: a re-run may change them.
SHARD_NEUTRAL_KEYS = ("perturbations", "measure", "signal", "keep_adapters", "eval_batch_size", "theta0_cache_mb")


@dataclass
class DaunceConfig(TrainingArgs):
    """`configs/daunce.yaml`: one perturbation's optimisation (TrainingArgs fields) plus Daunce's own settings."""

    epochs: float = field(default=1.0, metadata={"help": "one perturbation's budget in epochs over D_k"})
    learning_rate: float = 1e-3  # its help is TrainingArgs'
    perturbations: int = field(default=32, metadata={"help": "K, the number of perturbed fine-tunes"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the loss term γ·(ℓ(θ) − ℓ(θ₀))"})
    rho: float = field(default=1.0, metadata={"help": "perturbation size: w_i = 1 + ρ(2ξ_i − 1)"})
    subsample_ratio: float = field(default=1.0, metadata={"help": "fraction r of the training set in each D_k"})
    adapter: Literal["new", "continue"] = field(
        default="new", metadata={"help": "new: fresh zero-init LoRA on the merged target; continue: its own adapter"}
    )
    first_order: bool = field(default=True, metadata={"help": "false: plain loss on D_k (black-box Daunce)"})
    measure: Literal["cov", "corr"] = field(default="corr", metadata={"help": "score: covariance or correlation"})
    signal: Literal["loss", "margin"] = field(default="margin", metadata={"help": "score: loss or margin rows"})
    lora: LoraArgs = field(default_factory=lambda: LoraArgs(rank=64, alpha=128.0, layers=4),
                           metadata={"help": "the perturbation adapter (adapter: new)"})
    keep_adapters: bool = field(default=True, metadata={"help": "keep RUN/adapters/k for `llm-attr query`"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of the signal evaluation"})
    theta0_cache_mb: float = field(
        default=1024.0, metadata={"help": "cache θ₀'s response-token softmax up to this size, else recompute"}
    )
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perturbations < 2:
            raise ValueError(f"perturbations must be >= 2 (a covariance over k needs two), got {self.perturbations}")
        if not 0.0 < self.subsample_ratio <= 1.0:
            raise ValueError(f"subsample_ratio must be in (0, 1], got {self.subsample_ratio}")
        at_least(self, gamma=0, rho=0, seed=0, eval_batch_size=1)
        if not self.first_order and self.subsample_ratio == 1.0:
            logger.warning("first_order: false with subsample_ratio: 1 leaves no data perturbation: the K runs "
                           "differ only by LoRA init and data order")


# ---------------------------------------------------------------------- perturbation k's randomness


@dataclass
class PerturbationPlan:
    """Everything random in perturbation k, drawn from `(seed, k)` only (so any process computes the same)."""

    k: int
    subset: torch.Tensor  # [m] int64, sorted positions of D_k in the training set
    xi: torch.Tensor  # [N] float32, U(0, 1)
    init_seed: int  # LoRA A initialisation and dropout
    order_seed: int  # data order


def perturbation_plan(seed: int, k: int, n_train: int, subsample_ratio: float) -> PerturbationPlan:
    """Perturbation k's subset D_k (`round(r N)` positions), ξ `[N]` and seeds, all drawn from `(seed, k)`."""
    s_subset, s_xi, s_init, s_order = (int(s) for s in np.random.SeedSequence([seed, k]).generate_state(4))
    m = max(1, round(subsample_ratio * n_train))
    subset = torch.randperm(n_train, generator=torch.Generator().manual_seed(s_subset))[:m].sort().values
    xi = torch.rand(n_train, generator=torch.Generator().manual_seed(s_xi), dtype=torch.float32)
    return PerturbationPlan(k=k, subset=subset, xi=xi, init_seed=s_init, order_seed=s_order)


# ---------------------------------------------------------------------- the first-order term in logit space


def response_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Response positions of a batch: (b `[M]`, t `[M]`, target token `[M]`, 1/n_b `[M]`), rows in (b, t) order.

    Row (b, t) is the logit vector `logits[b, t]`, which predicts `labels[b, t + 1]`.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    n_resp = mask.sum(-1).clamp(min=1).float()
    return b_idx, t_idx, targets[b_idx, t_idx], 1.0 / n_resp[b_idx]


RowProbs = Callable[[slice], torch.Tensor]  # rows slice -> θ₀ softmax rows [c, V] float32


class _ResponseRows(torch.autograd.Function):
    """Per example `[B]`, over its response rows in chunks: nll_b = Σ coef·(logsumexp f − f_y) (mean NLL) and
    dot_b = Σ coef·⟨f, p₀ − e_y⟩. One pass over the rows forward, one backward (softmax recomputed from the saved
    log-sum-exp, p₀ re-read), one scatter into the logits' gradient."""

    @staticmethod
    def forward(ctx, logits, probs0: RowProbs | None, b_idx, t_idx, targets, coef, chunk: int):  # noqa: D102
        nll = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        dot = torch.zeros_like(nll)
        lse = torch.empty(b_idx.numel(), dtype=torch.float32, device=logits.device)
        for start in range(0, b_idx.numel(), chunk):
            sl = slice(start, start + chunk)
            f = logits[b_idx[sl], t_idx[sl]].float()
            f_y = f.gather(1, targets[sl, None]).squeeze(1)
            lse[sl] = torch.logsumexp(f, dim=-1)
            nll.index_add_(0, b_idx[sl], coef[sl] * (lse[sl] - f_y))
            if probs0 is not None:
                dot.index_add_(0, b_idx[sl], coef[sl] * ((f * probs0(sl)).sum(-1) - f_y))
        ctx.save_for_backward(logits, b_idx, t_idx, targets, coef, lse)
        ctx.probs0, ctx.chunk = probs0, chunk
        return nll, dot

    @staticmethod
    def backward(ctx, grad_nll, grad_dot):  # noqa: D102
        logits, b_idx, t_idx, targets, coef, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, b_idx.numel(), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            b = b_idx[sl]
            g_n, g_d = grad_nll[b][:, None], grad_dot[b][:, None]
            g = torch.exp(logits[b, t_idx[sl]].float() - lse[sl, None]).mul_(g_n)  # ∂nll/∂f = softmax − e_y
            if ctx.probs0 is not None:
                g.addcmul_(ctx.probs0(sl), g_d)  # ∂dot/∂f = p₀ − e_y
                g_n = g_n + g_d
            g[torch.arange(g.shape[0], device=g.device), targets[sl]] -= g_n.squeeze(1)
            grad[b, t_idx[sl]] = g.mul_(coef[sl, None]).to(logits.dtype)
        return grad, None, None, None, None, None, None


def response_nll_and_dot(logits: torch.Tensor, probs0: RowProbs | None, rows: tuple,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ_b `[B]`, ⟨f_b, ∂ℓ_b/∂f|θ₀⟩ `[B]`) float32 from one pass over the response rows, differentiable.

    ℓ_b is the mean NLL over response tokens (`losses.per_example_loss`, to float32 round-off);
    ⟨f, ∂ℓ_b/∂f|θ₀⟩ = Σ_t (1/n_b)⟨f_bt, p₀_bt − e_{y_bt}⟩ (0 when `probs0` is None). logits: `[B, T, V]`;
    probs0(rows slice) -> θ₀ softmax rows `[c, V]` float32; rows from `response_rows`. Memory beyond the logits
    and their gradient: one chunk of `chunk` rows (default 16 MiB fp32).
    """
    chunk = chunk or max(1, LOGIT_CHUNK_ELEMENTS // logits.shape[-1])
    b_idx, t_idx, targets, coef = rows
    return _ResponseRows.apply(logits, probs0, b_idx, t_idx, targets, coef, chunk)


class Theta0:
    """What the first-order term needs from θ₀ for each training example: ℓ_i(θ₀), ⟨f₀, ∂ℓ_i/∂f|θ₀⟩ and the softmax
    of f₀ at its response positions.

    Cached for the whole training set (one pass, shared by all K perturbations) when the softmax rows fit in
    `cache_mb`; otherwise recomputed each step from a no-grad forward pass under `reference()` (the perturbation
    adapter disabled, or the target adapter's initial weights swapped in): never a second model.
    """

    def __init__(self, model, examples: list[Example], pad_id: int,
                 reference: Callable[[], contextlib.AbstractContextManager], cache_mb: float, batch_size: int):
        self.model, self.examples, self.pad_id, self.reference = model, examples, pad_id, reference
        self._cache_mb = cache_mb
        n_rows = [sum(1 for y in e.labels[1:] if y != IGNORE_INDEX) for e in examples]
        head = model.get_output_embeddings()
        vocab, hidden = head.weight.shape
        self.offsets = torch.tensor([0, *np.cumsum(n_rows).tolist()], dtype=torch.long)
        # θ₀'s lm_head inputs ([M, D]) instead of its softmax rows ([M, V]) when the lm_head is frozen: the rows
        # are recomputed exactly from them, at V/D times less memory (85x for SmolLM2)
        self.head = None if any(p.requires_grad for p in head.parameters()) else head
        width = hidden if self.head is not None else vocab
        size_mb = 4 * int(self.offsets[-1]) * width / 2**20
        self.cached = size_mb <= cache_mb
        what = "lm_head inputs" if self.head is not None else "softmax"
        if self.cached:
            logger.info("caching θ₀'s %s over %d response tokens (%.0f MiB)", what, int(self.offsets[-1]), size_mb)
            self._build_cache(batch_size)
        else:
            logger.info("θ₀'s %s rows need %.0f MiB > theta0_cache_mb=%g: recomputing them each step",
                        what, size_mb, cache_mb)

    @torch.no_grad()
    def _build_cache(self, batch_size: int) -> None:
        from ..data.tokenize import collate

        device = next(self.model.parameters()).device
        vocab, hidden = self.model.get_output_embeddings().weight.shape
        n = len(self.examples)
        width = hidden if self.head is not None else vocab
        self.rows = torch.empty(int(self.offsets[-1]), width, dtype=torch.float32, device=device)
        self.loss0 = torch.empty(n, dtype=torch.float32, device=device)
        self.const0 = torch.empty(n, dtype=torch.float32, device=device)
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(n), key=token_lengths(self.examples).__getitem__)
        captured: list[torch.Tensor] = []
        hook = self.model.get_output_embeddings().register_forward_hook(
            lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                batch = collate([self.examples[i] for i in idx], self.pad_id)
                captured.clear()
                with self.reference():
                    logits0 = forward_logits(self.model, batch)
                labels = batch["labels"].to(device)
                rows = tuple(r.to(device) for r in response_rows(labels))
                probs = torch.softmax(logits0[rows[0], rows[1]].float(), dim=-1)
                index = torch.tensor(idx, device=device)
                self.loss0[index], self.const0[index] = response_nll_and_dot(logits0, lambda sl, p=probs: p[sl], rows)
                dest = self.rows_of(torch.tensor(idx)).to(device)
                if self.head is not None:
                    h = captured[-1][rows[0], rows[1]].float()
                    if s == 0 and not torch.allclose(self._softmax(h), probs, atol=1e-5):
                        logger.info("θ₀'s softmax is not the lm_head of its input here: caching the softmax")
                        self.head = None
                        hook.remove()
                        self.model.train(was_training)
                        return self._build_cache(batch_size) if self._fits_probs() else self._uncached()
                    self.rows[dest] = h
                else:
                    self.rows[dest] = probs
        finally:
            hook.remove()
        self.model.train(was_training)

    def _softmax(self, h: torch.Tensor) -> torch.Tensor:
        """θ₀'s softmax rows `[c, V]` float32 from its lm_head inputs `[c, D]`."""
        head = self.head
        return torch.softmax(torch.nn.functional.linear(h, head.weight.float(),
                                                        None if head.bias is None else head.bias.float()), dim=-1)

    def _fits_probs(self) -> bool:
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return 4 * int(self.offsets[-1]) * vocab / 2**20 <= self._cache_mb

    def _uncached(self) -> None:
        self.cached = False

    def rows_of(self, index: torch.Tensor) -> torch.Tensor:
        """Cache rows `[M]` of the examples at `index` `[B]` (their response tokens in order, example by example)."""
        starts, lens = self.offsets[index], self.offsets[index + 1] - self.offsets[index]
        shift = torch.repeat_interleave(starts - (lens.cumsum(0) - lens), lens)
        return shift + torch.arange(int(lens.sum()))

    def for_batch(self, batch: dict, labels: torch.Tensor, rows: tuple) -> tuple[torch.Tensor, torch.Tensor, RowProbs]:
        """(ℓ(θ₀) `[B]`, ⟨f₀, ∂ℓ/∂f|θ₀⟩ `[B]`, softmax-rows reader) for one training batch."""
        index = batch["index"].to(labels.device)
        if self.cached:
            dest = self.rows_of(index.cpu()).to(labels.device)
            if self.head is not None:  # the batch's rows once (read by the objective's forward and backward)
                probs = self._softmax(self.rows[dest])
                return self.loss0[index], self.const0[index], lambda sl: probs[sl]
            return self.loss0[index], self.const0[index], lambda sl: self.rows[dest[sl]]
        was_training = self.model.training
        self.model.eval()  # θ₀'s outputs are deterministic (no dropout), as in the cache
        with torch.no_grad(), self.reference():
            logits0 = forward_logits(self.model, batch, keep_last=labels.shape[1])  # the batch's response window
        self.model.train(was_training)

        def probs0(sl: slice) -> torch.Tensor:
            return torch.softmax(logits0[rows[0][sl], rows[1][sl]].float(), dim=-1)

        with torch.no_grad():
            loss0, const0 = response_nll_and_dot(logits0, probs0, rows)
        return loss0, const0, probs0


def perturbation_objective(theta0: Theta0, weights: torch.Tensor, gamma: float):
    """Objective `(model, batch, logits) -> [B]`: γ·(ℓ_i(θ) − ℓ_i(θ₀)) − w_i⟨f_θ − f_θ₀, ∂ℓ_i/∂f|θ₀⟩ (0 at θ₀)."""

    def objective(model, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        labels = batch["labels"].to(logits.device)
        rows = tuple(r.to(logits.device) for r in response_rows(labels))
        loss0, const0, probs0 = theta0.for_batch(batch, labels, rows)
        loss, linear = response_nll_and_dot(logits, probs0, rows)  # one pass over the response rows
        w = weights[batch["index"].to(logits.device)]
        return gamma * (loss - loss0) - w * (linear - const0)

    return objective


# ---------------------------------------------------------------------- the method


def featurize_config(config: DaunceConfig) -> dict[str, Any]:
    """The config keys that determine the shards (fingerprinted; the others may change between re-runs)."""
    return pipeline.shard_config(config, SHARD_NEUTRAL_KEYS)


class Daunce(pipeline.FeaturizeMethod, name="daunce", config_class=DaunceConfig):
    """`Daunce(config).run(model, train, query, out)`: K perturbed fine-tunes -> store of signals -> scores.

    Work items: the perturbations k = 0..K-1, one shard each (`computed` lists this process's last ones).
    """

    def _run(self, model, train_records, query_records, out: Path, *, overwrite: bool, score: bool,
             top_k: int) -> AttributionResult:
        cfg, state = self.config, self.context
        accelerator = state.accelerator()
        model, spec, model_fp = pipeline.model_identity(model)
        fp, parts = pipeline.run_fingerprint(METHOD, model_fp, train_records, query_records, featurize_config(cfg))
        header = {
            "config": to_dict(cfg),
            "model": {"spec": spec, "fingerprint": model_fp, "adapter": cfg.adapter},
            "ids": {"train": [r.id for r in train_records], "query": [r.id for r in query_records]},
            "shapes": {"train_signal": [len(train_records)], "query_signal": [len(query_records)]},
            "dtype": "float32",
            "signals": list(SIGNALS),
            "perturbations": cfg.perturbations,
        }
        store = pipeline.open_store(out, method=METHOD, fingerprint=fp, parts=parts, header=header, state=state,
                           inputs=self.inputs, train=train_records,
                           query=query_records, overwrite=overwrite, outputs=("adapters", *RUN_OUTPUTS))
        mine = pipeline.my_share(range(cfg.perturbations), state)
        todo = pipeline.todo(store, mine, shard_name)
        if cfg.keep_adapters:
            todo += [k for k in mine if k not in todo and not adapter_dir(out, k).is_dir()]
            todo.sort()
        logger.info("process %d/%d: %s", state.process_index, state.num_processes,
                    pipeline.work_summary("perturbations", len(todo), len(mine), cfg.perturbations))
        self.computed = []
        if todo:
            self._featurize(model, train_records, query_records, store, todo, accelerator)
        if pipeline.finish(store, [shard_name(k) for k in range(cfg.perturbations)], state, "perturbations") is not None:
            if score:
                self.scores = score_run(out, measure=cfg.measure, signal=cfg.signal, top_k=top_k)
        state.wait_for_everyone()
        return AttributionResult(out)  # a path too: `out / 'topk.md'` still works

    def _featurize(self, model, train_records: list[Record], query_records: list[Record], store: Store,
                   todo: list[int], accelerator) -> None:
        cfg = self.config
        device = accelerator.device
        if isinstance(model, str):
            net, tokenizer = load_target(model, cfg.adapter, device, cfg.dtype)
        else:
            net, tokenizer = model.model, model.tokenizer
        pad_id = pad_id_of(tokenizer)
        train_ex, _ = tokenize_records(train_records, tokenizer, cfg.max_length, source="train")
        query_ex, _ = tokenize_records(query_records, tokenizer, cfg.max_length, source="query")
        pm = PerturbationModel(net, cfg.adapter, cfg.lora)
        n_trainable = sum(p.numel() for p in pm.trainable.values())
        logger.info("Daunce: training %d perturbed copies of the target here (%s, %d trainable parameters each, "
                    "%g epoch(s) over %d of the %d training examples), then recording the loss and margin of every "
                    "training and query example (%d) under each", len(todo),
                    "first-order objective" if cfg.first_order else "plain loss", n_trainable, cfg.epochs,
                    max(1, round(cfg.subsample_ratio * len(train_ex))), len(train_ex), len(query_ex))
        # layers below the perturbation adapter are frozen: their outputs are computed once (models.prefix_cache)
        with prefix_cache(pm.model, [*train_ex, *query_ex], pad_id, batch_size=cfg.eval_batch_size,
                          autocast=functools.partial(autocast, cfg.precision, device)):
            theta0 = None
            if cfg.first_order:
                theta0 = Theta0(pm.model, train_ex, pad_id, pm.reference, cfg.theta0_cache_mb, cfg.eval_batch_size)
            overall = Overall(cfg.perturbations, "perturbation", done=cfg.perturbations - len(todo), log=logger)
            for k in todo:
                t0 = time.time()
                plan = perturbation_plan(cfg.seed, k, len(train_ex), cfg.subsample_ratio)
                pm.reset(plan.init_seed)
                if theta0 is not None:
                    weights = (1.0 + cfg.rho * (2.0 * plan.xi - 1.0)).to(device)
                    objective = perturbation_objective(theta0, weights, cfg.gamma)
                else:
                    objective = plain_objective
                args = dataclasses.replace(cfg, seed=plan.order_seed)
                result = train(pm.model, train_ex, args, pad_id, accelerator=accelerator, objective=objective,
                               subset=plan.subset.tolist(), data_parallel=False, desc=f"perturbation {k}")
                tensors = {}  # the loss-matrix row: both signals of every training and query example under θ_k
                for side, examples in (("train", train_ex), ("query", query_ex)):
                    signals = evaluate_signal(pm.model, examples, pad_id, batch_size=cfg.eval_batch_size,
                                              signal=SIGNALS, precision=cfg.precision)
                    tensors.update({f"{side}_{s}": signals[s] for s in SIGNALS})
                if cfg.keep_adapters:
                    pm.save(adapter_dir(store.root, k))
                tensors.update({"subset": plan.subset, "xi": plan.xi})
                seconds = time.time() - t0
                store.write_shard(shard_name(k), tensors, meta={
                    "k": k, "seed": [cfg.seed, k], "steps": result.steps, "final_objective": result.final_loss,
                    "seconds": round(seconds, 3), "process_index": accelerator.process_index,
                    "adapter_saved": cfg.keep_adapters,
                })
                self.computed.append(k)
                logger.debug("perturbation %d: %d steps, final objective %.4g, %.1fs", k, result.steps,
                             result.final_loss, seconds)
                overall.update()
                self._on_shard_written(k)
            overall.close()
        if cfg.adapter == "new":
            pm.model.unload()  # give a passed-in model back without LoRA layers
