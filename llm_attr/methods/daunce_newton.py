"""Daunce's `solver: newton`: each perturbation is one damped K-FAC Newton step from θ₀, not a few AdamW steps.

At θ₀ the perturbation objective γ·(ℓ_i(θ) − ℓ_i(θ₀)) − w_i⟨f_θ − f_θ₀, ∂ℓ_i/∂f|θ₀⟩ has the gradient
(1/m) Σ_{i∈D_k} (γ − w_i) ∇ℓ_i and the Gauss-Newton Hessian γ·H. Its quadratic model is minimised by

    δ_k = −(γ·H + λ)⁻¹ (1/m) Σ_{i∈D_k} (γ − w_i) ∇ℓ_i,

which is where the AdamW steps are headed. A short run gets there only in the high-curvature directions (the ones
many examples share, such as a response that a backdoor and genuine refusals have in common); the rare, flat
directions that carry a backdoor's trigger have barely moved. The loss-matrix kernel of short runs is then closer
to gᵀ F g than to the influence kernel gᵀ H⁻¹ g. The Newton step moves every direction by its own curvature.

H is K-FAC over each LoRA module of the perturbation adapter, from two factors per adapted layer, computed once at
θ₀ over the training set: the layer input's covariance C_x `[in, in]` (over real tokens) and the per-example
covariance of the gradient at the layer's output S `[out, out]`. With the LoRA weights B `[out, r]`, A `[r, in]` and
scale s (ΔW = s·B A), lora_B sees the input A x and the output gradient s·δ: factors A C_x Aᵀ and s² S; lora_A sees
x and s·Bᵀδ: factors C_x and s² Bᵀ S B. The damped inverse is taken in each module's Kronecker eigenbasis, with λ the
`newton_damping` quantile of the eigenvalues of the module's Kronecker product (`newton_damping_rule: quantile`: the
same place in any model's spectrum; a real model's is so heavy-tailed that a fraction of the mean, the `mean` rule,
damps nearly every direction: docs/results.md, levers 11), or that fraction of their mean.

`antithetic: true` evaluates each step both ways, θ₀ ± δ_k, and records the half-difference of the two rows: the
first-order (odd) part of every example's change, with the second-order part, which raises every example's loss
together under any large step, cancelled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokenize import Example, collate
from ..losses import autocast, per_example_loss, response_window, window_logits
from ..runner import PerturbationModel, trainable_lora_layers
from ..utils import progress
from .daunce_objective import reweighting

logger = logging.getLogger(__name__)

#: θ₀'s K-FAC sums are computed in this many fixed parts of the training set (split over processes, kept in the
#: run directory): the same sums in the same order for any number of processes
FACTOR_PARTS = 8
#: the step length's first calibration is over this many training examples (drawn from the seed)
PROBE_EXAMPLES = 64


def damping_of(eig: torch.Tensor, damping: float, rule: str) -> float:
    """λ of one LoRA weight from its Kronecker eigenvalues `eig` (`[out, in]`): their `damping` quantile (rule
    quantile), or `damping` times their mean (rule mean)."""
    flat = eig.flatten()
    if rule == "quantile":
        return float(flat.kthvalue(max(1, round(damping * flat.numel()))).values) + 1e-30
    return damping * float(flat.mean()) + 1e-30


@dataclass
class LayerFactors:
    """K-FAC statistics of one adapted linear layer at θ₀: C_x `[in, in]`, S `[out, out]` (float64)."""

    inputs: torch.Tensor
    output_grads: torch.Tensor


@dataclass
class _Part:
    """One trainable LoRA weight (lora_A or lora_B of one layer) and its Kronecker eigenbasis."""

    param: torch.nn.Parameter
    q_out: torch.Tensor  # [out, out] eigenvectors of the output-side factor
    q_in: torch.Tensor  # [in, in]
    eig: torch.Tensor  # [out, in] products of the two factors' eigenvalues


def _adapter_name(layer) -> str:
    names = [n for n in layer.lora_A if layer.lora_A[n].weight.requires_grad]
    if len(names) != 1:
        raise ValueError(f"{type(layer).__name__}: expected one trainable LoRA adapter, found {names}")
    return names[0]


@contextlib.contextmanager
def _captured(layers: list, mask_ref: list) -> Iterator[dict]:
    """While active, every forward pass adds each layer's Σ x xᵀ (input) and Σ δ δᵀ (gradient at its output), over
    the real tokens of `mask_ref[0]` (`[B, T]` bool), to the dict it yields: `{i: [Σxxᵀ, Σδδᵀ, n_tokens]}`, float32
    products accumulated in place, also under bf16 autocast (bf16 products were 5x faster matmuls but moved SmolLM2's
    backdoor AUPRC from 0.80 to 0.72 for the same seeds; docs/results.md, levers 8)."""
    sums: dict[int, list] = {}
    handles = []

    def add(entry: list, slot: int, v: torch.Tensor) -> None:
        with torch.autocast(v.device.type, enabled=False):
            if entry[slot] is None:
                entry[slot] = v.T @ v
            else:
                entry[slot].addmm_(v.T, v)

    def hook_for(i: int):
        def hook(module, inputs, output):
            if not output.requires_grad:
                raise RuntimeError(f"{type(module).__name__}: its output does not depend on a trainable weight")
            mask = mask_ref[0]
            entry = sums.setdefault(i, [None, None, 0])
            add(entry, 0, inputs[0].detach()[mask].float())
            entry[2] += int(mask.sum())

            def grad_hook(g):
                add(entry, 1, g.detach()[mask].float())

            output.register_hook(grad_hook)
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook_for(i)))
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()


def _loss_pass(pm: PerturbationModel, examples: list[Example], positions: list[int], coef: torch.Tensor,
               pad_id: int, batch_size: int, precision: str, mask_ref: list | None = None,
               desc: str | None = None, head=None) -> None:
    """Backward of Σ_i coef_i · ℓ_i over `positions` (ℓ_i: mean NLL over example i's response tokens; `coef [N]`),
    in batches; gradients accumulate in the trainable parameters' `.grad`. `head`: a reduced lm_head (exact at θ₀)."""
    device = next(pm.model.parameters()).device
    for start in progress(range(0, len(positions), batch_size), desc=desc, disable=desc is None):
        idx = positions[start : start + batch_size]
        batch = collate([examples[i] for i in idx], pad_id)
        if mask_ref is not None:
            mask_ref[0] = batch["attention_mask"].bool().to(device)
        keep = response_window(batch["labels"])
        with autocast(precision, device):
            logits, labels = window_logits(pm.model, batch, keep, head)
        losses = per_example_loss(logits.float(), labels.to(device))
        (losses * coef[idx].to(device)).sum().backward()


def factor_sums(pm: PerturbationModel, examples: list[Example], positions: list[int], pad_id: int, *,
                batch_size: int, precision: str, desc: str | None = None, head=None) -> dict[str, torch.Tensor]:
    """K-FAC sums of θ₀ (the adapter at its start; a new one's B is 0) over the examples at `positions`:
    `{"x.{i}": Σ x xᵀ, "d.{i}": Σ δ δᵀ}` float64 per adapted layer i, `"tokens"` and `"examples"` (counts). Sums of
    disjoint parts add up to the whole (`stored_factor_sums` keeps 8 fixed parts in the run directory)."""
    layers = trainable_lora_layers(pm.model)
    mask_ref = [None]
    was_training = pm.model.training
    pm.model.eval()
    with _captured(layers, mask_ref) as sums:
        _loss_pass(pm, examples, positions, torch.ones(len(examples)), pad_id, batch_size, precision, mask_ref,
                   desc=desc, head=head)
    for p in pm.trainable.values():
        p.grad = None
    pm.model.train(was_training)
    out = {"examples": torch.tensor(len(positions), dtype=torch.float64),
           "tokens": torch.tensor(float(sums[0][2]) if sums else 0.0, dtype=torch.float64)}
    for i in range(len(layers)):
        out[f"x.{i}"], out[f"d.{i}"] = sums[i][0].double(), sums[i][1].double()
    return out


class NewtonSolver:
    """K-FAC factors of θ₀ from `factor_sums` (of all the training set), then `direction(coef, positions)` gives
    δ_k at the adapter's current weights and `apply(δ, c)` sets the adapter to θ₀ + c·δ."""

    def __init__(self, pm: PerturbationModel, examples: list[Example], pad_id: int, *, batch_size: int,
                 precision: str, damping: float, gamma: float, sums: dict[str, torch.Tensor] | None = None,
                 head=None, kernel: str = "step", damping_rule: str = "mean"):
        self.pm, self.examples, self.pad_id, self.head, self.kernel = pm, examples, pad_id, head, kernel
        self.damping_rule = damping_rule
        self.batch_size, self.precision, self.damping, self.gamma = batch_size, precision, damping, gamma
        self.layers = trainable_lora_layers(pm.model)
        if sums is None:
            sums = factor_sums(pm, examples, list(range(len(examples))), pad_id, batch_size=batch_size,
                               precision=precision, desc="K-FAC factors of θ₀", head=head)
        self.factors = [LayerFactors(inputs=sums[f"x.{i}"] / sums["tokens"], output_grads=sums[f"d.{i}"] /
                                     sums["examples"]) for i in range(len(self.layers))]
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # eigenbases of fixed factors

    def _zero_grads(self) -> None:
        for p in self.pm.trainable.values():
            p.grad = None

    def _basis(self, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vals, vecs = torch.linalg.eigh(factor.double())
        return vals.clamp_min(0.0), vecs

    def _parts(self) -> list[_Part]:
        """Each trainable LoRA weight with its factors' eigenbases at the adapter's current A and B."""
        parts = []
        for i, layer in enumerate(self.layers):
            name = _adapter_name(layer)
            a = layer.lora_A[name].weight.detach().double()  # [r, in]
            b = layer.lora_B[name].weight.detach().double()  # [out, r]
            s = float(layer.scaling[name])
            f = self.factors[i]
            if (i, "out") not in self._cache:  # the [out, out] and [in, in] bases: once; the [r, r] ones: each time
                self._cache[i, "out"] = self._basis(s * s * f.output_grads)
            out_vals, out_vecs = self._cache[i, "out"]
            in_vals, in_vecs = self._basis(a @ f.inputs @ a.T)  # lora_B: input A x, output gradient s δ
            parts.append(_Part(layer.lora_B[name].weight, out_vecs, in_vecs, torch.outer(out_vals, in_vals)))
            if bool(b.abs().sum() > 0):  # lora_A moves only where B ≠ 0 (a fresh adapter's B is 0)
                if (i, "in") not in self._cache:
                    self._cache[i, "in"] = self._basis(f.inputs)
                iv, iq = self._cache[i, "in"]
                ov, oq = self._basis(s * s * b.T @ f.output_grads @ b)
                parts.append(_Part(layer.lora_A[name].weight, oq, iq, torch.outer(ov, iv)))
        return parts

    @staticmethod
    def coefficients(cfg, xi: torch.Tensor) -> torch.Tensor:
        """`[N]` the objective's gradient weights at θ₀: γ − w_i with w_i = 1 + ρ(2ξ_i − 1) (first-order objective),
        or 1 (plain loss on D_k)."""
        weights = reweighting(xi, cfg.rho)
        return (cfg.gamma - weights) if cfg.first_order else torch.ones_like(weights)

    def gradient(self, coef: torch.Tensor, positions: list[int]) -> dict[str, torch.Tensor]:
        """∇ of (1/m) Σ_{i∈positions} coef_i ℓ_i at θ₀ per trainable parameter name (float64)."""
        self._zero_grads()
        was_training = self.pm.model.training
        self.pm.model.eval()
        _loss_pass(self.pm, self.examples, positions, coef / len(positions), self.pad_id, self.batch_size,
                   self.precision, head=self.head)
        self.pm.model.train(was_training)
        grads = {n: (p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64))
                 for n, p in self.pm.trainable.items()}
        self._zero_grads()
        return grads

    def direction(self, coef: torch.Tensor, positions: list[int]) -> dict[str, torch.Tensor]:
        """δ_k `{name: tensor}` = −(γ·H_KFAC + λ)⁻¹ ∇ at the adapter's current weights (θ₀ after `pm.reset`), over the
        LoRA weights (others: 0). `apply` moves from those weights."""
        self._at = {n: p.detach().clone() for n, p in self.pm.trainable.items()}
        grads = self.gradient(coef, positions)
        by_id = {id(p): n for n, p in self.pm.trainable.items()}
        delta = {n: torch.zeros_like(p) for n, p in self.pm.trainable.items()}
        for part in self._parts():
            name = by_id[id(part.param)]
            g = grads[name]
            rotated = part.q_out.T @ g @ part.q_in
            lam = damping_of(part.eig, self.damping, self.damping_rule)
            curv = self.gamma * part.eig
            # step: (γe + λ)⁻¹; influence: [(γe + λ/100)(γe + λ)]^-½, so that e·p² = 1/(γe + λ) down to e ≈ λ/100
            precond = 1 / (curv + lam) if self.kernel == "step" else ((curv + lam / 100) * (curv + lam)).rsqrt()
            delta[name] = (-(part.q_out @ (rotated * precond) @ part.q_in.T)).to(part.param.dtype)
        return delta

    def rows(self, coef: torch.Tensor, positions: list[int], scale: float, evaluate, antithetic: bool) -> dict:
        """`evaluate()`'s rows `{key: tensor}` under θ₀ + c·δ_k (δ_k from `coef`, `positions`; c = `scale`); with
        `antithetic`, the half-difference of those under θ₀ ± c·δ_k, plus `train_loss_even` (their mean). The
        adapter is left at θ₀ + c·δ_k."""
        delta = self.direction(coef, positions)
        self.apply(delta, scale)
        tensors = evaluate()
        if antithetic:  # the odd part of the change: (plus − minus) / 2
            self.apply(delta, -scale)
            minus = evaluate()
            even = (tensors["train_loss"] + minus["train_loss"]) / 2
            tensors = {key: (v - minus[key]) / 2 if key in minus else v for key, v in tensors.items()}
            tensors["train_loss_even"] = even
            self.apply(delta, scale)
        return tensors

    @torch.no_grad()
    def curvature(self, delta: dict[str, torch.Tensor]) -> float:
        """δᵀ H_KFAC δ over the LoRA weights (H at the adapter's weights when `direction` was called)."""
        by_id = {id(p): n for n, p in self.pm.trainable.items()}
        total = 0.0
        for part in self._parts():
            rotated = part.q_out.T @ delta[by_id[id(part.param)]].double() @ part.q_in
            total += float((part.eig * rotated.square()).sum())
        return total

    @torch.no_grad()
    def calibrate(self, delta: dict[str, torch.Tensor], probe: list[int], target_ratio: float,
                  eval_batch_size: int = 64, tolerance: float = 0.05, max_evaluations: int = 24,
                  start: float | None = None) -> float:
        """The scale c for which the mean training loss over `probe` under θ₀ + c·δ is `target_ratio` times that
        under θ₀, to `tolerance` of the excess (target_ratio − 1). The first guess is the K-FAC quadratic model's
        (½ c² δᵀHδ; `start`: another); each next one takes the excess as a power of c, its exponent (1-8) from
        the last two evaluations (2 at first), until a c below and one above bracket it; then interpolation in
        log c and log excess. The evaluated c closest to the wanted excess is kept. `δ` is left scaled by c, in place."""
        import math

        from ..losses import evaluate_signal

        examples = [self.examples[i] for i in probe]

        def mean_loss() -> float:
            return float(evaluate_signal(self.pm.model, examples, self.pad_id, batch_size=eval_batch_size,
                                         precision=self.precision, head=self.head).mean())

        self.apply(delta, 0.0)
        base = mean_loss()
        want = target_ratio - 1.0

        def excess(c: float) -> float:
            self.apply(delta, c)
            return mean_loss() / base - 1.0

        curvature = self.curvature(delta)
        c = first = start or ((2.0 * want * base / curvature) ** 0.5 if curvature > 0 and base > 0 else 1.0)
        lo, hi, last, best = (0.0, None), (float("inf"), None), None, None  # (c, excess) below / above the wanted
        for _ in range(max_evaluations):
            e = excess(c)
            logger.debug("calibration: c %.4g, excess %.4g (wanted %.4g)", c, e, want)
            if best is None or abs(e - want) < abs(best[1] - want):
                best = (c, e)
            if abs(e - want) <= tolerance * want:
                break
            if e < want:
                lo = (c, e)
            else:
                hi = (c, e)
            if 0.0 < lo[0] and hi[0] / lo[0] < 1.02:  # c known to 2% (the loss's own rounding can hide the rest)
                break
            if 0.0 < lo[0] and hi[0] < float("inf"):  # bracketed: interpolate in log c, log excess (else bisect)
                t = 0.5
                if lo[1] > 0:
                    t = min(max(math.log(want / lo[1]) / math.log(hi[1] / lo[1]), 0.1), 0.9)
                c = lo[0] * (hi[0] / lo[0]) ** t
                continue
            power = 2.0  # not bracketed yet: the excess as a power of c, fitted to the last two evaluations
            if last is not None and e > 0 and last[1] > 0 and last[0] != c and last[1] != e:
                power = min(max(math.log(e / last[1]) / math.log(c / last[0]), 1.0), 8.0)
            last = (c, e)
            c = c * min(max((want / max(e, 1e-12)) ** (1.0 / power), 1e-3), 1e3)  # within x1000
        c, e = best  # the evaluated scale closest to the wanted excess (the last one, unless evaluations ran out)
        logger.info("calibrated the step scale to %.4g in %d loss evaluations of %d examples (first guess %.4g; "
                    "excess %.4g, wanted %.4g)", c, _ + 1, len(probe), first, e, want)
        for n in delta:
            delta[n].mul_(c)
        self.apply(delta, 0.0)
        return c

    @torch.no_grad()
    def apply(self, delta: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        """Set the adapter to θ₀ + scale·δ (θ₀: its weights when `direction` was called)."""
        for n, p in self.pm.trainable.items():
            p.copy_(self._at[n])
            p.add_(delta[n], alpha=scale)


def factor_positions(n_train: int, n_examples: int, seed: int) -> list[int]:
    """The training positions θ₀'s K-FAC factors are computed over: all (`n_examples` 0 or ≥ `n_train`), else a
    fixed draw of `n_examples` from `seed` (sorted; the same in every process)."""
    if n_examples <= 0 or n_examples >= n_train:
        return list(range(n_train))
    draw = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 7919))[:n_examples]
    return sorted(draw.tolist())


def stored_factor_sums(pm: PerturbationModel, examples: list[Example], pad_id: int, folder: Path, *,
                       process_index: int, num_processes: int, batch_size: int, precision: str, head=None,
                       positions: list[int] | None = None) -> dict:
    """θ₀'s K-FAC sums over the training examples at `positions` (default: all), in `FACTOR_PARTS` fixed parts
    (FOLDER/part-P-of-008; the same parts, added in the same order, whatever the number of processes): each process
    computes the parts not yet on disk, its own share first, and reads the others; two processes may compute the
    same part, never wait on each other, and a re-run reads them all."""
    from safetensors.torch import load_file, save_file

    from ..io import atomic_write

    positions = list(range(len(examples))) if positions is None else positions
    n_parts = min(FACTOR_PARTS, len(positions))
    folder.mkdir(parents=True, exist_ok=True)
    mine = list(range(process_index, n_parts, num_processes))
    paths = [folder / f"part-{p:03d}-of-{n_parts:03d}.safetensors" for p in range(n_parts)]
    for p in [*mine, *(p for p in range(n_parts) if p not in mine)]:
        if not paths[p].is_file():
            sums = factor_sums(pm, examples, positions[p::n_parts], pad_id, batch_size=batch_size,
                               precision=precision, desc=f"K-FAC factors of θ₀, part {p + 1}/{n_parts}", head=head)
            sums = {key: value.float() for key, value in sums.items()}  # float32 on disk: half the size
            atomic_write(paths[p], lambda tmp, sums=sums: save_file(sums, tmp))
    total = {key: value.double() for key, value in load_file(str(paths[0])).items()}
    for path in paths[1:]:  # added in part order, one part in memory at a time (each is the factors' size)
        for key, value in load_file(str(path)).items():
            total[key] += value.double()
    return total


def newton_solver(pm: PerturbationModel, examples: list[Example], pad_id: int, cfg, plan0, folder: Path,
                  process_index: int, num_processes: int, head=None) -> tuple[NewtonSolver, float]:
    """The solver of a Daunce run (`cfg`: its DaunceConfig) and the scale of every step, calibrated on perturbation
    0's (`plan0`: its PerturbationPlan; the same in every process) over 64 training examples drawn from the seed."""
    sums = stored_factor_sums(pm, examples, pad_id, folder, process_index=process_index, num_processes=num_processes,
                              batch_size=cfg.batch_size, precision=cfg.precision, head=head,
                              positions=factor_positions(len(examples), cfg.newton_factor_examples, cfg.seed))
    solver = NewtonSolver(pm, examples, pad_id, batch_size=cfg.batch_size, precision=cfg.precision,
                          damping=cfg.newton_damping, gamma=cfg.gamma if cfg.first_order else 1.0, sums=sums,
                          head=head, kernel=cfg.newton_kernel, damping_rule=cfg.newton_damping_rule)
    pm.reset(plan0.init_seed)
    delta = solver.direction(solver.coefficients(cfg, plan0.xi), plan0.subset.tolist())
    probe = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed))[:PROBE_EXAMPLES].tolist()
    scale = solver.calibrate(delta, probe, cfg.newton_loss_ratio, cfg.eval_batch_size)
    if cfg.newton_calibration == "training_set" and len(probe) < len(examples):
        # a well-fit target's losses are heavy-tailed: 64 examples' mean can be far from the training set's (the
        # refined ratio on SmolLM2's backdoor target: 1.01 and 1.15 for two seeds' probes set to 1.05)
        scale *= solver.calibrate(delta, list(range(len(examples))), cfg.newton_loss_ratio, cfg.eval_batch_size,
                                  tolerance=0.1, max_evaluations=6, start=1.0)
    logger.info("Daunce newton: steps scaled by %.3g (training loss x%.3g on %s)", scale, cfg.newton_loss_ratio,
                "the training set" if cfg.newton_calibration == "training_set" else f"a probe of {len(probe)}")
    return solver, scale


def mirror_state(kept: dict[str, torch.Tensor], mode: str, theta0: dict[str, torch.Tensor] | None) -> dict:
    """The adapter state (peft's keys) of θ₀ − δ from a kept θ₀ + δ: −B for a new adapter (whose θ₀ is B = 0, with
    the same A), 2·θ₀ − θ for the target's own (`theta0`: its state)."""
    if mode == "new":
        return {n: -v if "lora_B" in n else v for n, v in kept.items()}
    return {n: 2 * theta0[n].to(v) - v for n, v in kept.items()}
