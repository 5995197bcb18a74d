"""Daunce: attribution by the covariance of per-example signals over K randomly perturbed fine-tunes of the target.

For each perturbation k (everything random drawn from `(seed, k)`): a subset D_k of the training set, weights
ξ ~ U(0, 1) and a LoRA adapter on top of θ₀ (the target) trained briefly on

    γ·(ℓ_i(θ) − ℓ_i(θ₀)) − w_i ⟨f_θ(x_i) − f_θ₀(x_i), ∂ℓ_i/∂f |θ₀⟩,   w_i = 1 + ρ(2ξ_i − 1)

(f: logits; the first-order term is computed in logit space over response tokens, in token chunks), or with
`first_order: false` the plain loss on D_k (black-box Daunce). Then every training and query example's loss and
margin under θ_k is one shard of the store; scores are the covariance (or correlation) over k.
See DESIGN.md section 3.

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
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import to_dict
from ..data.records import Record, as_records, records_fingerprint, save_jsonl
from ..data.tokenize import IGNORE_INDEX, Example, pad_id_of, token_lengths, tokenize_records
from ..errors import ConfigError, RunDirError
from ..io import atomic_write_json, contained_path, fingerprint, locked
from ..losses import Signal, evaluate_signal, forward_logits
from ..models.lora import LoraArgs
from ..scoring import (
    Measure,
    ScoreFile,
    as_tensor,
    covariance_scores,
    format_topk,
    load_scores,
    prepare_train_signals,
    record_text,
    self_influence,
    topk_rows,
    write_ids,
    write_topk_table,
)
from ..store import Store, model_fingerprint, module_fingerprint
from ..training import TrainingArgs, plain_objective, train

logger = logging.getLogger(__name__)

METHOD = "daunce"
SIGNALS: tuple[Signal, ...] = ("loss", "margin")
#: fp32 elements of one chunk of logit rows in the first-order term (16 MiB): rows per chunk = this // vocab.
LOGIT_CHUNK_ELEMENTS = 1 << 22
#: Files a run writes beside its store (deleted with it by --overwrite).
RUN_OUTPUTS = ("scores.safetensors", "ids.json", "topk.md", "scores.json", "self_influence.safetensors",
               "self_influence.md", "train.jsonl", "query.jsonl")
#: Config keys that change how a run is computed or scored but not its shards: a re-run may change them.
SHARD_NEUTRAL_KEYS = ("perturbations", "measure", "signal", "keep_adapters", "eval_batch_size", "theta0_cache_mb")


@dataclass
class DaunceConfig(TrainingArgs):
    """`configs/daunce.yaml`: one perturbation's optimisation (TrainingArgs fields) plus Daunce's own settings."""

    epochs: float = field(default=1.0, metadata={"help": "one perturbation's budget in epochs over D_k"})
    learning_rate: float = 1e-3
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
    lora: LoraArgs = field(default_factory=lambda: LoraArgs(rank=64, alpha=128.0),
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
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.rho < 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not self.first_order and self.subsample_ratio == 1.0:
            logger.warning("first_order: false with subsample_ratio: 1 leaves no data perturbation: the K runs "
                           "differ only by LoRA init and data order")


def shard_name(k: int) -> str:
    return f"perturbation-{k:05d}"


def adapter_dir(run: Path, k: int) -> Path:
    return Path(run) / "adapters" / f"{k:05d}"


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
        n_rows = [sum(1 for y in e.labels[1:] if y != IGNORE_INDEX) for e in examples]
        vocab = model.get_output_embeddings().weight.shape[0]
        self.offsets = torch.tensor([0, *np.cumsum(n_rows).tolist()], dtype=torch.long)
        size_mb = 4 * int(self.offsets[-1]) * vocab / 2**20
        self.cached = size_mb <= cache_mb
        if self.cached:
            logger.info("caching θ₀'s softmax over %d response tokens (%.0f MiB)", int(self.offsets[-1]), size_mb)
            self._build_cache(batch_size)
        else:
            logger.info("θ₀'s softmax rows need %.0f MiB > theta0_cache_mb=%g: recomputing them each step",
                        size_mb, cache_mb)

    @torch.no_grad()
    def _build_cache(self, batch_size: int) -> None:
        from ..data.tokenize import collate

        device = next(self.model.parameters()).device
        vocab = self.model.get_output_embeddings().weight.shape[0]
        n = len(self.examples)
        self.probs = torch.empty(int(self.offsets[-1]), vocab, dtype=torch.float32, device=device)
        self.loss0 = torch.empty(n, dtype=torch.float32, device=device)
        self.const0 = torch.empty(n, dtype=torch.float32, device=device)
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(n), key=token_lengths(self.examples).__getitem__)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            batch = collate([self.examples[i] for i in idx], self.pad_id)
            with self.reference():
                logits0 = forward_logits(self.model, batch)
            labels = batch["labels"].to(device)
            rows = tuple(r.to(device) for r in response_rows(labels))
            probs = torch.softmax(logits0[rows[0], rows[1]].float(), dim=-1)
            index = torch.tensor(idx, device=device)
            self.loss0[index], self.const0[index] = response_nll_and_dot(logits0, lambda sl, p=probs: p[sl], rows)
            self.probs[self.rows_of(torch.tensor(idx)).to(device)] = probs
        self.model.train(was_training)

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
            return self.loss0[index], self.const0[index], lambda sl: self.probs[dest[sl]]
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


# ---------------------------------------------------------------------- the perturbation model


@contextlib.contextmanager
def swapped_weights(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give `params` the `values` (no copy of the model: LoRA-sized tensors swapped in place)."""
    saved = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = values[n]
        yield
    finally:
        for n, p in params.items():
            p.data = saved[n]


class PerturbationModel:
    """θ₀ plus a trainable adapter, reset to its start before each perturbation (no model copy per k).

    `adapter: new`: the target merged into plain weights plus a fresh LoRA (A re-drawn from the perturbation's seed,
    B = 0); θ₀ is the adapter disabled. `adapter: continue`: the target's own adapter, trainable, reset to its
    trained weights; θ₀ is those weights swapped in.
    """

    def __init__(self, model, mode: Literal["new", "continue"], lora: LoraArgs):
        from ..models.lora import attach_lora

        self.mode = mode
        if mode == "new":
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = attach_lora(model, lora)
        else:
            if not hasattr(model, "peft_config"):
                raise ConfigError("adapter: continue needs a model with its LoRA adapter (a fine-tuned run directory)")
            self.model = model
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n or "modules_to_save" in n)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ConfigError("the perturbation model has no trainable parameters")
        self.start = {n: p.detach().clone() for n, p in self.trainable.items()}

    def reset(self, init_seed: int) -> None:
        """Back to θ₀; with a new adapter, LoRA A re-drawn (kaiming-uniform, as peft) from `init_seed`."""
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.start[n])
            if self.mode == "new":
                gen = torch.Generator().manual_seed(init_seed)
                for n, p in self.trainable.items():
                    if ".lora_A." in n:
                        fresh = torch.empty(p.shape, dtype=torch.float32)
                        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
                        p.copy_(fresh)
        torch.manual_seed(init_seed)  # dropout

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which the model computes θ₀'s outputs."""
        if self.mode == "new":
            return self.model.disable_adapter()
        return swapped_weights(self.trainable, self.start)

    def save(self, path: Path) -> None:
        """Save the adapter (peft format) to `path` atomically (temp folder + rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.model.save_pretrained(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def load_target(spec: str, mode: Literal["new", "continue"], device, dtype: str = "auto"):
    """(model, tokenizer) of a target for a perturbation mode: merged for `new`, base + trainable adapter for `continue`."""
    from ..models.loading import is_run_dir, load_model, load_tokenizer, run_base
    from ..models.lora import load_adapter

    if mode == "new":
        loaded = load_model(spec, device=device, dtype=dtype)
        return loaded.model, loaded.tokenizer
    if not is_run_dir(spec):
        raise ConfigError(f"adapter: continue needs a fine-tuned run directory (with adapter/) as model, got {spec}")
    base = load_model(run_base(spec), device=device, dtype=dtype)
    model = load_adapter(base.model, str(Path(spec) / "adapter"), trainable=True)
    has_own = (Path(spec) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(spec)) if has_own else base.tokenizer
    return model, tokenizer


# ---------------------------------------------------------------------- the method


def featurize_config(config: DaunceConfig) -> dict[str, Any]:
    """The config keys that determine the shards (fingerprinted; the others may change between re-runs)."""
    return {k: v for k, v in to_dict(config).items() if k not in SHARD_NEUTRAL_KEYS}


class Daunce:
    """`Daunce(config).run(model, train, query, out)`: K perturbed fine-tunes -> store of signals -> scores."""

    def __init__(self, config: DaunceConfig | None = None):
        self.config = config or DaunceConfig()
        self.computed: list[int] = []  # perturbations this process computed in the last run()
        self.scores: dict[str, Any] | None = None  # figures and text table of the last run's scoring (main process)

    def _on_shard_written(self, k: int) -> None:
        """Called after perturbation k's shard is written (a hook for tests and progress reporting)."""

    @locked("daunce")
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
        """Featurize (the missing perturbations of this process), then the main process scores; returns `out`.

        model: a spec (`builtin:tiny`, a model dir, a fine-tuned run dir) or a `LoadedModel` (modified in place).
        train, query: JSONL paths, dataset dirs, or lists of records. Under `accelerate launch` process r computes
        perturbations r, r + P, ...; the result does not depend on P.
        """
        from accelerate import Accelerator, PartialState

        cfg = self.config
        cpu = not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        accelerator = Accelerator(cpu=cpu)
        out = Path(out)
        train_records, query_records = as_records(train), as_records(query)
        if isinstance(model, str):
            from ..models.loading import canonical_spec

            spec, model_fp = canonical_spec(model), model_fingerprint(model)
        else:
            spec, model_fp = getattr(model, "spec", "in-memory model"), module_fingerprint(model.model)
        fp = fingerprint({"method": METHOD, "model": model_fp, "train": records_fingerprint(train_records),
                          "query": records_fingerprint(query_records), "config": featurize_config(cfg)})
        header = {
            "config": to_dict(cfg),
            "model": {"spec": spec, "fingerprint": model_fp, "adapter": cfg.adapter},
            "ids": {"train": [r.id for r in train_records], "query": [r.id for r in query_records]},
            "shapes": {"train_signal": [len(train_records)], "query_signal": [len(query_records)]},
            "dtype": "float32",
            "signals": list(SIGNALS),
            "perturbations": cfg.perturbations,
        }
        if overwrite and state.is_main_process and (out / "manifest.json").is_file():
            for stale in ("adapters", *RUN_OUTPUTS):
                p = out / stale
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        store = Store.create(out, method=METHOD, fingerprint=fp, header=header, overwrite=overwrite,
                             is_main=state.is_main_process, barrier=state.wait_for_everyone)
        if state.is_main_process:
            save_jsonl(train_records, out / "train.jsonl")
            save_jsonl(query_records, out / "query.jsonl")
        mine = list(range(state.process_index, cfg.perturbations, state.num_processes))
        todo = [k for k in mine if store.missing([shard_name(k)])]
        if cfg.keep_adapters:
            todo += [k for k in mine if k not in todo and not adapter_dir(out, k).is_dir()]
            todo.sort()
        logger.info("process %d/%d: perturbations %s to compute (%d of its %d already done)", state.process_index,
                    state.num_processes, todo, len(mine) - len(todo), len(mine))
        self.computed = []
        if todo:
            self._featurize(model, train_records, query_records, store, todo, accelerator)
        state.wait_for_everyone()
        if state.is_main_process:
            manifest = store.finalize([shard_name(k) for k in range(cfg.perturbations)])
            if not manifest["complete"]:
                raise RunDirError(f"{out}: some perturbations are missing after the run; re-run the same command")
            if score:
                self.scores = score_run(out, measure=cfg.measure, signal=cfg.signal, top_k=top_k)
        state.wait_for_everyone()
        return out

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
        logger.info("Daunce: %d training / %d query examples, %d trainable parameters per perturbation, "
                    "first_order=%s", len(train_ex), len(query_ex), n_trainable, cfg.first_order)
        theta0 = None
        if cfg.first_order:
            theta0 = Theta0(pm.model, train_ex, pad_id, pm.reference, cfg.theta0_cache_mb, cfg.eval_batch_size)
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
                signals = evaluate_signal(pm.model, examples, pad_id, batch_size=cfg.eval_batch_size, signal=SIGNALS)
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
            logger.info("perturbation %d: %d steps, final objective %.4g, %.1fs", k, result.steps,
                        result.final_loss, seconds)
            self._on_shard_written(k)
        if cfg.adapter == "new":
            pm.model.unload()  # give a passed-in model back without LoRA layers


# ---------------------------------------------------------------------- scoring a run, querying an index


def _signal_rows(store: Store, k_count: int, key: str) -> torch.Tensor:
    """`[K, n]` float32: tensor `key` of the first `k_count` perturbation shards."""
    return torch.stack([store.read_shard(shard_name(k))[key] for k in range(k_count)])


def _check_k(store: Store, perturbations: int | None) -> int:
    manifest = store.manifest
    k_count = perturbations or manifest["perturbations"]
    if k_count < 2:
        raise ConfigError(f"scoring needs at least 2 perturbations, got {k_count}")
    missing = store.missing([shard_name(k) for k in range(k_count)])
    if missing:
        raise RunDirError(f"{store.root}: {len(missing)} of the first {k_count} perturbation shards are missing "
                          f"({missing[:3]}...); re-run `llm-attr daunce` with the same arguments to compute them")
    return k_count


def _train_texts(run: Path, indices: set[int]) -> dict[int, str]:
    """Shortened `prompt → response` of the training records at `indices` (RUN/train.jsonl, read line by line)."""
    out: dict[int, str] = {}
    path = run / "train.jsonl"
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in indices and line.strip():
                out[i] = record_text(json.loads(line))
    return out


def prepared_train_signals(store: Store, k_count: int, signal: str, measure: Measure) -> np.ndarray:
    """`[K, N]` float32 memory-mapped: the first `k_count` shards' train signals centred and scaled for `measure`
    (`scoring.prepare_train_signals`), computed once and kept in RUN/prepared/ (as large as the signals it
    prepares), keyed by the shards' checksums so that a recomputed shard is never scored with stale data."""
    names = [shard_name(k) for k in range(k_count)]
    n_train = len(store.manifest["ids"]["train"])
    key = fingerprint([store.shard_info(n)["sha256"] for n in names])
    path = store.root / "prepared" / f"train_{signal}_{measure}_K{k_count}.safetensors"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                if (f.metadata() or {}).get("key") == key:
                    return load_scores(path, name="signals")
        except Exception as e:  # a torn or foreign file: prepare it again
            logger.warning("%s: unreadable (%s); preparing it again", path, e)

    def read(start: int, stop: int) -> torch.Tensor:
        return torch.stack([store.read_slice(n, f"train_{signal}", start, stop) for n in names])

    sf = ScoreFile(path, (k_count, n_train), name="signals", metadata={"key": key, "measure": measure})
    try:
        prepare_train_signals(read, sf.array, measure=measure, n_train=n_train)
    except BaseException:
        sf.abort()
        raise
    sf.commit()
    return load_scores(path, name="signals")


def write_scores(out: Path, query_signals: torch.Tensor, run: Path, store: Store, k_count: int, signal: str,
                 measure: Measure, query_ids: list[str], top_k: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Score `query_signals [K, Q]` against the store's train signals into `out`: scores, ids, top-k table."""
    train_ids = store.manifest["ids"]["train"]
    t0 = time.time()
    prepared = prepared_train_signals(store, k_count, signal, measure)
    sf = ScoreFile(out / "scores.safetensors", (len(query_ids), len(train_ids)),
                   metadata={"measure": measure, "signal": signal, "perturbations": k_count})
    try:
        covariance_scores(query_signals, as_tensor(prepared), measure=measure, out=sf.array, prepared=True)
        values, indices = topk_rows(sf.array, top_k)
    except BaseException:
        sf.abort()
        raise
    sf.commit()
    write_ids(out / "ids.json", query_ids, train_ids)
    texts = _train_texts(run, set(indices.ravel().tolist()))
    title = f"Daunce top-{top_k} ({measure} of {signal}, K={k_count})"
    write_topk_table(out / "topk.md", query_ids, train_ids, values, indices, texts.get, title=title)
    info = {"measure": measure, "signal": signal, "perturbations": k_count, "top_k": top_k,
            "seconds": round(time.time() - t0, 3), **meta}
    atomic_write_json(out / "scores.json", info)
    logger.info("wrote %s [%d x %d] and %s", out / "scores.safetensors", len(query_ids), len(train_ids),
                out / "topk.md")
    info["table"] = format_topk(query_ids, train_ids, values, indices, texts.get)
    return info


@locked("daunce scoring", dir_arg="run")
def score_run(run: str | Path, *, measure: Measure = "corr", signal: Signal = "margin",
              perturbations: int | None = None, top_k: int = 10) -> dict[str, Any]:
    """Score a Daunce run's queries from its store: RUN/scores.safetensors, ids.json, topk.md, scores.json.

    `perturbations`: use the first K shards only (default: the run's K). Returns the figures and a text table.
    """
    run = Path(run)
    store = Store.open(run, METHOD)
    k_count = _check_k(store, perturbations)
    query = _signal_rows(store, k_count, f"query_{signal}")
    return write_scores(run, query, run, store, k_count, signal, measure, store.manifest["ids"]["query"], top_k,
                        {"run": str(run)})


@locked("daunce self-influence", dir_arg="run")
def score_self_influence(run: str | Path, *, signal: Signal = "margin", perturbations: int | None = None,
                         top_k: int = 10) -> dict[str, Any]:
    """Self-influence: variance over k of each training example's signal -> RUN/self_influence.{safetensors,md}."""
    from safetensors.torch import save_file

    from ..io import atomic_write, atomic_write_text
    from ..scoring import shorten

    run = Path(run)
    store = Store.open(run, METHOD)
    k_count = _check_k(store, perturbations)
    train_ids = store.manifest["ids"]["train"]
    names = [shard_name(k) for k in range(k_count)]
    def read(start: int, stop: int) -> torch.Tensor:
        return torch.stack([store.read_slice(n, f"train_{signal}", start, stop) for n in names])

    variance = self_influence(read, n_train=len(train_ids))
    atomic_write(run / "self_influence.safetensors", lambda tmp: save_file({"self_influence": variance}, tmp))
    values, indices = torch.topk(variance, min(top_k, len(train_ids)))
    texts = _train_texts(run, set(indices.tolist()))
    lines = [f"# Self-influence: variance of the {signal} over K={k_count} perturbations", "",
             "| rank | train id | variance | training text |", "|---:|---|---:|---|"]
    rows = [f"{'rank':>4}  {'train id':<14} {'variance':>10}  training text"]
    for rank, (v, j) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
        text = texts.get(j, "")
        lines.append(f"| {rank} | {train_ids[j]} | {v:.4g} | {shorten(text).replace('|', chr(92) + '|')} |")
        rows.append(f"{rank:>4}  {train_ids[j]:<14} {v:>10.4g}  {shorten(text, 60)}")
    atomic_write_text(run / "self_influence.md", "\n".join(lines) + "\n")
    logger.info("wrote %s and %s", run / "self_influence.safetensors", run / "self_influence.md")
    return {"signal": signal, "perturbations": k_count, "table": "\n".join(rows), "self_influence": variance}


@locked("daunce query")
def query_run(run: str | Path, query: str | Path | list, out: str | Path, *, measure: Measure | None = None,
              signal: Signal | None = None, perturbations: int | None = None, top_k: int = 10,
              batch_size: int | None = None) -> dict[str, Any]:
    """Score new queries against a Daunce index: K forward passes with the kept adapters, the stored train signals.

    Writes OUT/scores.safetensors, ids.json, topk.md, scores.json and query_signals.safetensors (`loss`, `margin`
    `[K, Q]`, to rescore without the model). Returns the figures and a text table.
    """
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from ..io import atomic_write
    from ..models.loading import auto_device, is_run_dir, load_model

    run, out = Path(run), Path(out)
    store = Store.open(run, METHOD)
    manifest = store.manifest
    cfg = manifest["config"]
    measure = measure or cfg["measure"]
    signal = signal or cfg["signal"]
    k_count = _check_k(store, perturbations)
    for k in range(k_count):  # the adapter index: each RUN/adapters/k must lie inside the run (no symlink out)
        contained_path(run, str(adapter_dir(run, k).relative_to(run) / "adapter_model.safetensors"),
                       f"{run}: adapter index, perturbation {k}")
    missing = [k for k in range(k_count) if not (adapter_dir(run, k) / "adapter_model.safetensors").is_file()]
    if missing:
        raise RunDirError(f"{run}: adapters of perturbations {missing[:5]} are missing (run made with "
                          "keep_adapters: false?); `llm-attr query` needs them")
    spec = manifest["model"]["spec"]
    if model_fingerprint(spec) != manifest["model"]["fingerprint"]:
        raise RunDirError(f"{run}: the model {spec} has changed since this index was built (fingerprint differs)")
    device = auto_device()
    if manifest["model"]["adapter"] == "new":
        loaded = load_model(spec, device=device, dtype=cfg.get("dtype", "auto"))
        base, tokenizer = loaded.model, loaded.tokenizer
    else:
        if not is_run_dir(spec):
            raise RunDirError(f"{run}: adapter: continue index whose model {spec} is not a run directory")
        base, tokenizer = load_target(spec, "continue", device, cfg.get("dtype", "auto"))
        base = base.unload()  # the kept adapters replace the target's own
    records = as_records(query)
    examples, _ = tokenize_records(records, tokenizer, cfg["max_length"], source=str(query) if isinstance(
        query, (str, Path)) else "query")
    pad_id = pad_id_of(tokenizer)
    model = PeftModel.from_pretrained(base, str(adapter_dir(run, 0)), is_trainable=False)
    rows = {s: [] for s in SIGNALS}
    for k in range(k_count):
        if k:
            set_peft_model_state_dict(model, load_file(str(adapter_dir(run, k) / "adapter_model.safetensors")))
        values = evaluate_signal(model, examples, pad_id, batch_size=batch_size or cfg["eval_batch_size"],
                                 signal=SIGNALS)
        for s in SIGNALS:
            rows[s].append(values[s])
    signals = {s: torch.stack(rows[s]) for s in SIGNALS}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "query_signals.safetensors", lambda tmp: save_file(signals, tmp))
    save_jsonl(records, out / "query.jsonl")
    return write_scores(out, signals[signal], run, store, k_count, signal, measure, [r.id for r in records],
                        top_k, {"run": str(run), "query": str(query) if isinstance(query, (str, Path)) else "records"})
