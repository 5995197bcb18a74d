"""Daunce's settings (`configs/daunce.yaml` ↔ `DaunceConfig`) and the randomness of perturbation k, drawn from
`(seed, k)` alone so that any process computes any perturbation identically."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..config import at_least, check_choices
from ..data import spans
from ..models.lora import LoraArgs
from ..training import TrainingArgs
from .daunce_blocks import RowBlocks

logger = logging.getLogger(__name__)

#: Config keys that change how a run is computed or scored but not its shards: a re-run may change them.
SHARD_NEUTRAL_KEYS = ("perturbations", "measure", "signal", "keep_adapters", "eval_batch_size", "theta0_cache_mb",
                      "query_span")


@dataclass
class DaunceConfig(TrainingArgs):
    """`configs/daunce.yaml`: one perturbation's optimisation (TrainingArgs fields) plus Daunce's own settings."""

    epochs: float = field(default=1.0, metadata={"help": "one perturbation's budget in epochs over D_k"})
    learning_rate: float = 1e-3  # its help is TrainingArgs'
    perturbations: int = field(default=32, metadata={"help": "K, the number of perturbed fine-tunes"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the loss term γ·(ℓ(θ) − ℓ(θ₀))"})
    rho: float = field(default=1.0, metadata={"help": "perturbation size: w_i = 1 + ρ(2ξ_i − 1)"})
    subsample_ratio: float = field(default=0.25, metadata={"help": "fraction r of the training set in each D_k "
                                   "(0.25: each perturbation a quarter of the steps; docs/results.md, budget frontier)"})
    adapter: Literal["auto", "new", "continue"] = field(default="auto", metadata={"help": "new: fresh zero-init LoRA "
        "on the merged target; continue: its own adapter; auto: continue where the target is a LoRA adapter"})
    first_order: bool = field(default=True, metadata={"help": "false: plain loss on D_k (black-box Daunce)"})
    measure: Literal["cov", "corr"] = field(default="corr", metadata={"help": "score: covariance or correlation"})
    signal: Literal["loss", "margin"] = field(default="margin", metadata={"help": "score: loss or margin rows"})
    query_span: str = field(default=spans.RESPONSE, metadata={"help": "score: " + spans.HELP})
    lora: LoraArgs = field(default_factory=lambda: LoraArgs(rank=64, alpha=128.0, layers=4),
                           metadata={"help": "the perturbation adapter (adapter: new); layers: continue's too"})
    keep_adapters: bool = field(default=True, metadata={"help": "keep RUN/adapters/k for `llm-attr query`"})
    solver: Literal["adamw", "newton"] = field(default="newton", metadata={"help": "one perturbation: newton (one "
                                         "damped K-FAC Newton step; methods/daunce_newton.py) | adamw (optimiser steps)"})
    newton_damping: float = field(default=0.5, metadata={"help": "newton: λ of each LoRA weight, as the quantile of "
        "its K-FAC eigenvalues (newton_damping_rule: quantile) or a fraction of their mean (mean)"})
    newton_damping_rule: Literal["quantile", "mean"] = field(default="quantile", metadata={"help": "newton: quantile "
        "(λ at the same place in any model's spectrum) | mean (a fraction of the mean eigenvalue)"})
    newton_kernel: Literal["step", "influence"] = field(default="step", metadata={"help": "newton: step (δ = −(H + λ)⁻¹∇; "
        "rows' covariance → gᵀ(H + λ)⁻¹H(H + λ)⁻¹g) | influence (δ = −[H(H + λ)]^-½∇; → gᵀ(H + λ)⁻¹g)"})
    newton_loss_ratio: float = field(default=1.05, metadata={"help": "newton: the steps' length, as the training loss "
                                     "under θ₀ + δ over θ₀'s (calibrated once, on perturbation 0's step)"})
    newton_factor_examples: int = field(default=0, metadata={"help": "newton: θ₀'s K-FAC over N examples; 0: all"})
    newton_calibration: Literal["probe", "training_set"] = field(default="training_set", metadata={"help": "newton: "
        "the step length set on 64 examples (probe), then refined on all (training_set)"})
    antithetic: bool = field(default=False, metadata={"help": "newton: rows are (ℓ(θ₀ + δ) − ℓ(θ₀ − δ)) / 2"})
    row_blocks: RowBlocks = field(default="none", metadata={"help": "also record each perturbation's rows with one "
                                  "block of its change at a time: none | layer | module (methods/daunce_blocks.py)"})
    head_top_k: int = field(default=64, metadata={"help": "rows and Newton passes: the lm_head over each label, θ₀'s top "
                            "N other tokens and one linear tail logit (exact at θ₀; reduced_head.py); 0: full"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of the signal evaluation"})
    theta0_cache_mb: float = field(default=1024.0, metadata={"help": "cache θ₀'s response softmax up to this (MB)"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perturbations < 2:
            raise ValueError(f"perturbations must be >= 2 (a covariance over k needs two), got {self.perturbations}")
        if not 0.0 < self.subsample_ratio <= 1.0:
            raise ValueError(f"subsample_ratio must be in (0, 1], got {self.subsample_ratio}")
        at_least(self, gamma=0, rho=0, seed=0, eval_batch_size=1, head_top_k=0, newton_damping=0, newton_factor_examples=0)
        if self.newton_damping_rule == "quantile" and not self.newton_damping < 1:
            raise ValueError(f"newton_damping is a quantile in [0, 1) with newton_damping_rule: quantile, got {self.newton_damping}")
        spans.check_span(self.query_span)
        check_choices(self)
        if self.antithetic and (self.solver != "newton" or self.row_blocks != "none"):
            raise ValueError("antithetic: true needs solver: newton (a trained step has no exact mirror), no row_blocks")
        if not self.first_order and self.subsample_ratio == 1.0 and self.solver == "adamw":
            logger.warning("first_order: false, subsample_ratio: 1: no data perturbation (only LoRA init and order)")


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


#: keys added after stores were written: left out of the fingerprint at these values, so those stores stay valid
LATER_KEYS = {"row_blocks": "none", "solver": "adamw", "newton_damping": 0.1, "newton_loss_ratio": 1.05,
              "antithetic": False, "head_top_k": 0, "newton_factor_examples": 0, "newton_calibration": "probe",
              "newton_kernel": "step", "newton_damping_rule": "mean"}
