"""Daunce: attribution by the covariance of per-example signals over K randomly perturbed fine-tunes of the target.

For each perturbation k (everything random drawn from `(seed, k)`): a subset D_k of the training set, weights
ξ ~ U(0, 1), and a LoRA adapter on top of θ₀ (the target) moved towards the minimiser of

    γ·(ℓ_i(θ) − ℓ_i(θ₀)) − w_i ⟨f_θ(x_i) − f_θ₀(x_i), ∂ℓ_i/∂f |θ₀⟩,   w_i = 1 + ρ(2ξ_i − 1)

(f: logits), by one damped K-FAC Newton step (`solver: newton`, methods/daunce_newton.py) or a few AdamW steps
(`solver: adamw`, methods/daunce_objective.py); `first_order: false` uses the plain loss on D_k. Every example's
loss and margin under θ_k is one shard of the store; scores are their covariance (or correlation) over k.

    llm-attr daunce --model RUN_DIR --train train.jsonl --query query.jsonl --out OUT [--set perturbations=32]
    accelerate launch --multi_gpu --num_processes 2 -m llm_attr daunce ...   # K split over processes; resumable
    llm-attr score OUT --measure cov --signal loss      # rescore from the stored rows (--self: self-influence)
    llm-attr query OUT --query new.jsonl --out Q        # new queries: K forward passes with the kept adapters
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .. import pipeline
from ..config import to_dict
from ..data import spans
from ..data.records import Record
from ..data.tokenize import pad_id_of, tokenize_records
from ..losses import autocast, evaluate_signal, evaluate_token_signals
from ..models.prefix_cache import prefix_cache
from ..reduced_head import reduced_head
from ..results import AttributionResult
from ..runner import PerturbationModel, load_target, resolved_adapter, swapped_weights  # noqa: F401 (also imported here)
from ..store import Store
from ..training import TrainResult, plain_objective, train
from ..utils import Overall
from . import daunce_tokens
from .daunce_blocks import adapter_blocks, block_rows
from .daunce_config import (  # noqa: F401 (also imported from here)
    LATER_KEYS,
    SHARD_NEUTRAL_KEYS,
    DaunceConfig,
    PerturbationPlan,
    perturbation_plan,
)
from .daunce_newton import newton_solver
from .daunce_objective import (  # noqa: F401 (also imported from here)
    LOGIT_CHUNK_ELEMENTS,
    RowProbs,
    Theta0,
    perturbation_objective,
    response_nll_and_dot,
    response_rows,
    reweighting,
)
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

#: Files a run writes beside its store (deleted with it by --overwrite).
RUN_OUTPUTS = ("newton_factors", "scores.safetensors", "ids.json", "topk.md", "scores.json", "self_influence.safetensors",
               "self_influence.md", "prepared", "train.jsonl", "query.jsonl")
def featurize_config(config: DaunceConfig) -> dict[str, Any]:
    """The config keys that determine the shards (fingerprinted; the others may change between re-runs)."""
    return pipeline.shard_config(config, SHARD_NEUTRAL_KEYS, LATER_KEYS)


class Daunce(pipeline.FeaturizeMethod, name="daunce", config_class=DaunceConfig):
    """`Daunce(config).run(model, train, query, out)`: K perturbed fine-tunes -> store of signals -> scores.
    Work items: the perturbations k = 0..K-1, one shard each (`computed` lists this process's last ones)."""

    def _run(self, model, train_records, query_records, out: Path, *, overwrite: bool, score: bool,
             top_k: int) -> AttributionResult:
        cfg, state = self.config, self.context
        accelerator = state.accelerator()
        model, spec, model_fp = pipeline.model_identity(model)
        self.adapter = resolved_adapter(cfg.adapter, model)
        fp, parts = pipeline.run_fingerprint(METHOD, model_fp, train_records, query_records, featurize_config(cfg))
        header = {
            "config": to_dict(cfg),
            "model": {"spec": spec, "fingerprint": model_fp, "adapter": self.adapter},
            "ids": {"train": [r.id for r in train_records], "query": [r.id for r in query_records]},
            "shapes": {"train_signal": [len(train_records)], "query_signal": [len(query_records)]},
            "dtype": "float32", "signals": list(SIGNALS),
            "perturbations": cfg.perturbations,
            "measurement": {"query_span": cfg.query_span, "per_token": True},
        }
        store = pipeline.open_store(out, method=METHOD, fingerprint=fp, parts=parts, header=header, state=state,
                                    inputs=self.inputs, train=train_records, query=query_records,
                                    overwrite=overwrite, outputs=("adapters", *RUN_OUTPUTS))
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
                self.scores = score_run(out, measure=cfg.measure, signal=cfg.signal, top_k=top_k,
                                        query_span=cfg.query_span)
        state.wait_for_everyone()
        return AttributionResult(out)  # a path too: `out / 'topk.md'` still works

    def _featurize(self, model, train_records: list[Record], query_records: list[Record], store: Store,
                   todo: list[int], accelerator) -> None:
        cfg = self.config
        device = accelerator.device
        if isinstance(model, str):
            net, tokenizer = load_target(model, self.adapter, device, cfg.dtype)
        else:
            net, tokenizer = model.model, model.tokenizer
        pad_id = pad_id_of(tokenizer)
        train_ex, _ = tokenize_records(train_records, tokenizer, cfg.max_length, source="train")
        query_ex, _ = tokenize_records(query_records, tokenizer, cfg.max_length, source="query")
        chars = spans.query_token_chars(query_records, query_ex, tokenizer)
        given = self.inputs.get("query")
        spans.span_masks(query_records, chars, cfg.query_span,  # a query without its span stops the run here
                         source=str(given) if isinstance(given, (str, Path)) else "query")
        pm = PerturbationModel(net, self.adapter, cfg.lora)
        n_trainable = sum(p.numel() for p in pm.trainable.values())
        logger.info("Daunce: %d perturbed copies of the target here (%s, %d trainable parameters each, %s over %d "
                    "of the %d training examples), then recording the loss and margin of every training and query "
                    "example (%d) under each", len(todo),
                    "first-order objective" if cfg.first_order else "plain loss", n_trainable,
                    f"{cfg.epochs:g} epoch(s) of AdamW" if cfg.solver == "adamw" else "one K-FAC Newton step",
                    max(1, round(cfg.subsample_ratio * len(train_ex))), len(train_ex), len(query_ex))
        # layers below the perturbation adapter are frozen: their outputs are computed once (models.prefix_cache)
        t_setup = time.time()
        with prefix_cache(pm.model, [*train_ex, *query_ex], pad_id, batch_size=cfg.eval_batch_size,
                          autocast=functools.partial(autocast, cfg.precision, device)):
            theta0 = newton = None
            head = reduced_head(pm.model, [*train_ex, *query_ex], pad_id, top_k=cfg.head_top_k,
                                batch_size=cfg.eval_batch_size, precision=cfg.precision, reference=pm.reference)
            if cfg.solver == "newton":  # K-FAC factors of θ₀ once; each perturbation is then one gradient pass
                newton, step_scale = newton_solver(
                    pm, train_ex, pad_id, cfg, perturbation_plan(cfg.seed, 0, len(train_ex), cfg.subsample_ratio),
                    store.root / "newton_factors", self.context.process_index, self.context.num_processes, head)
            elif cfg.first_order:
                theta0 = Theta0(pm.model, train_ex, pad_id, pm.reference, cfg.theta0_cache_mb, cfg.eval_batch_size)
            blocks = adapter_blocks(pm, cfg.row_blocks) if cfg.row_blocks != "none" else []

            def rows() -> dict[str, torch.Tensor]:  # the loss-matrix row: both signals of every example
                out = {}
                for side, examples in (("train", train_ex), ("query", query_ex)):
                    signals = evaluate_signal(pm.model, examples, pad_id, batch_size=cfg.eval_batch_size,
                                              signal=SIGNALS, precision=cfg.precision, head=head)
                    out.update({f"{side}_{s}": signals[s] for s in SIGNALS})
                return out

            def all_rows() -> dict[str, torch.Tensor]:  # rows, block rows and the queries' per-token rows
                tensors = rows()
                if blocks:
                    tensors.update(block_rows(pm, blocks, rows))
                tensors.update(daunce_tokens.token_tensors(evaluate_token_signals(
                    pm.model, query_ex, pad_id, batch_size=cfg.eval_batch_size, signals=SIGNALS,
                    precision=cfg.precision, head=head)))
                return tensors

            setup_seconds = time.time() - t_setup  # the prefix cache, θ₀'s outputs or K-FAC factors: once a process
            overall = Overall(cfg.perturbations, "perturbation", done=cfg.perturbations - len(todo), log=logger)
            for k in todo:
                t0 = time.time()
                plan = perturbation_plan(cfg.seed, k, len(train_ex), cfg.subsample_ratio)
                pm.reset(plan.init_seed)
                if newton is not None:  # θ₀ + δ_k (antithetic: the odd part of θ₀ ± δ_k)
                    tensors = newton.rows(newton.coefficients(cfg, plan.xi), plan.subset.tolist(), step_scale,
                                          all_rows, cfg.antithetic)
                    result = TrainResult(steps=0, final_loss=None)  # no optimiser steps
                else:
                    objective = plain_objective
                    if theta0 is not None:
                        objective = perturbation_objective(theta0, reweighting(plan.xi, cfg.rho).to(device), cfg.gamma)
                    args = dataclasses.replace(cfg, seed=plan.order_seed)
                    result = train(pm.model, train_ex, args, pad_id, accelerator=accelerator, objective=objective,
                                   subset=plan.subset.tolist(), data_parallel=False, desc=f"perturbation {k}")
                    tensors = all_rows()  # under θ_k; with row_blocks, also under each block of its change alone
                if cfg.keep_adapters:
                    pm.save(adapter_dir(store.root, k))
                tensors.update({"subset": plan.subset, "xi": plan.xi})
                seconds = time.time() - t0
                store.write_shard(shard_name(k), tensors, meta={
                    "k": k, "seed": [cfg.seed, k], "steps": result.steps, "final_objective": result.final_loss,
                    "seconds": round(seconds, 3), "process_index": accelerator.process_index,
                    "adapter_saved": cfg.keep_adapters,
                    **({"setup_seconds": round(setup_seconds, 3)} if not self.computed else {}),
                })
                daunce_tokens.write_token_layout(store, chars)  # after a shard: a run that computed nothing stays so
                self.computed.append(k)
                logger.debug("perturbation %d: %d steps, final objective %.4g, %.1fs", k, result.steps,
                             result.final_loss, seconds)
                overall.update()
                self._on_shard_written(k)
            overall.close()
        if self.adapter == "new":
            pm.model.unload()  # give a passed-in model back without LoRA layers
