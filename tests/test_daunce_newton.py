"""Daunce's `solver: newton`: K-FAC factors and the damped Newton step against brute-force autograd, the step-size
calibration, antithetic rows (stored, and re-computed by `llm-attr query` from the kept adapters), and the reduced
lm_head of the rows and Newton passes against the full vocabulary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llm_attr.data.backdoor import make_backdoor_task
from llm_attr.data.records import load_records, save_jsonl
from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
from llm_attr.finetune import FinetuneConfig, finetune
from llm_attr.losses import evaluate_signal, forward_logits, per_example_loss, response_window, window_logits
from llm_attr.methods.daunce import (
    Daunce,
    DaunceConfig,
    PerturbationModel,
    adapter_dir,
    load_target,
    query_run,
    shard_name,
)
from llm_attr.methods.daunce_newton import (
    NewtonSolver,
    _adapter_name,
    factor_positions,
    factor_sums,
    stored_factor_sums,
)
from llm_attr.models.lora import LoraArgs
from llm_attr.reduced_head import reduced_head
from llm_attr.runner import lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """builtin:tiny with a rank-4 LoRA fine-tuned for a few steps on 32 backdoor records, and 3 queries."""
    d = tmp_path_factory.mktemp("newton")
    train, triggered, _ = make_backdoor_task(n_train=32, n_query=3, fraction=0.125, seed=2)
    save_jsonl(train, d / "train.jsonl")
    save_jsonl(triggered, d / "query.jsonl")
    cfg = FinetuneConfig(max_steps=6, batch_size=8, learning_rate=3e-3, max_length=64, lora=LoraArgs(rank=4, alpha=8.0))
    run = finetune("builtin:tiny", d / "train.jsonl", d / "target", cfg)
    return SimpleNamespace(dir=d, run=run, train=d / "train.jsonl", query=d / "query.jsonl")


def _solver(target, mode: str, damping: float = 0.1, kernel: str = "step", rule: str = "mean"):
    net, tok = load_target(str(target.run), mode, "cpu")
    pm = PerturbationModel(net, mode, LoraArgs(rank=4, alpha=8.0))
    examples, _ = tokenize_records(list(load_records(target.train)), tok, 64)
    return pm, examples, pad_id_of(tok), NewtonSolver(pm, examples, pad_id_of(tok), batch_size=8,
                                                      precision="fp32", damping=damping, gamma=1.0,
                                                      kernel=kernel, damping_rule=rule)


def _brute_force_factors(pm, examples, pad_id):
    """Per layer: C_x (mean x xᵀ over real tokens) and S (Σ over examples of Σ_t δ_t δ_tᵀ, / N), one example at a
    time with `torch.autograd.grad` of its own loss with respect to each layer's output."""
    layers = lora_layers(pm.model)
    xx = [0.0] * len(layers)
    dd = [0.0] * len(layers)
    n_tok = 0
    for e in examples:
        batch = collate([e], pad_id)
        captured: list = []
        handles = [m.register_forward_hook(lambda mod, i, o, into=captured: into.append((i[0], o))) for m in layers]
        loss = per_example_loss(forward_logits(pm.model, batch), batch["labels"]).sum()
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [o for _, o in captured])
        for i, ((x, _), g) in enumerate(zip(captured, grads, strict=True)):
            x2, g2 = x[0].detach().double(), g[0].double()
            xx[i] = xx[i] + x2.T @ x2
            dd[i] = dd[i] + g2.T @ g2
        n_tok += batch["input_ids"].shape[1]
    return [(a / n_tok, s / len(examples)) for a, s in zip(xx, dd, strict=True)]


@pytest.mark.parametrize(("mode", "kernel", "rule"), [("continue", "step", "mean"), ("new", "step", "mean"),
                                                    ("continue", "influence", "mean"), ("continue", "step", "quantile"),
                                                    ("new", "step", "quantile")])
def test_factors_and_step_solve_the_damped_kfac_system(target, mode, kernel, rule):
    """The hooked factors equal per-example autograd's; δ solves (γ·S_p ⊗ A_p + λ) δ = −∇ for every LoRA weight,
    with ∇ the brute-force gradient of (1/m) Σ coef_i ℓ_i (lora_A only where B ≠ 0); `newton_kernel: influence`'s
    δ is −[(H + λ/100)(H + λ)]^-½ ∇ with H = S_p ⊗ A_p built densely, so that Cov(δ) = P H P → (H + λ)⁻¹. λ is 0.1 x
    the mean eigenvalue of that dense H (rule mean) or the median of its eigenvalues (rule quantile, 0.5)."""
    pm, examples, pad_id, solver = _solver(target, mode, damping=0.5 if rule == "quantile" else 0.1, kernel=kernel,
                                           rule=rule)
    truth = _brute_force_factors(pm, examples, pad_id)
    for f, (a, s) in zip(solver.factors, truth, strict=True):
        torch.testing.assert_close(f.inputs, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))  # float32 sums
        torch.testing.assert_close(f.output_grads, s, rtol=1e-4, atol=1e-5 * float(s.abs().max()))
    positions = [0, 3, 5, 8, 13, 21]
    coef = torch.linspace(-1, 1, len(examples))
    delta = solver.direction(coef, positions)
    pm.model.zero_grad()
    loss = 0.0
    for i in positions:
        batch = collate([examples[i]], pad_id)
        loss = loss + coef[i] * per_example_loss(forward_logits(pm.model, batch), batch["labels"]).sum()
    loss = loss / len(positions)
    names = list(pm.trainable)
    grads = dict(zip(names, torch.autograd.grad(loss, [pm.trainable[n] for n in names], allow_unused=True),
                     strict=True))
    by_param = {id(p): n for n, p in pm.trainable.items()}
    checked, quadratic = 0, 0.0
    for i, layer in enumerate(lora_layers(pm.model)):
        name = _adapter_name(layer)
        a_w, b_w, s = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double(), layer.scaling[name]
        c_x, c_s = truth[i]
        sides = {"B": (s * s * c_s, a_w @ c_x @ a_w.T, layer.lora_B[name].weight)}
        if b_w.abs().sum() > 0:
            sides["A"] = (s * s * b_w.T @ c_s @ b_w, c_x, layer.lora_A[name].weight)
        for out_f, in_f, param in sides.values():
            d, g = delta[by_param[id(param)]].double(), grads[by_param[id(param)]].double()
            lam = 0.1 * (torch.trace(out_f) / out_f.shape[0]) * (torch.trace(in_f) / in_f.shape[0])
            if rule == "quantile":  # the median of the dense Kronecker product's eigenvalues
                spectrum = torch.linalg.eigvalsh(torch.kron(out_f, in_f).detach()).clamp_min(0).sort().values
                lam = spectrum[round(0.5 * len(spectrum)) - 1]
            if kernel == "influence":  # vec(S X A) = (S ⊗ A) vec(X) for symmetric A, row-major vec
                vals, vecs = torch.linalg.eigh(torch.kron(out_f, in_f).detach())
                vals = vals.clamp_min(0)
                root = vecs @ torch.diag(((vals + lam / 100) * (vals + lam)).rsqrt()) @ vecs.T
                # the near-null directions amplify the factors' float32 rounding (rtol 1e-4 above) by up to 10/λ
                torch.testing.assert_close(d.reshape(-1), -(root @ g.reshape(-1)), rtol=1e-2,
                                           atol=1e-4 * float(d.abs().max()))
            else:
                torch.testing.assert_close(out_f @ d @ in_f + lam * d, -g, rtol=1e-3,
                                           atol=1e-5 * float(g.abs().max()))
            quadratic += float((d * (out_f @ d @ in_f)).sum().detach())
            checked += 1
    assert checked >= len(lora_layers(pm.model)) * (2 if mode == "continue" else 1)
    assert solver.curvature(delta) == pytest.approx(quadratic, rel=1e-4)  # δᵀHδ: the calibration's first guess


def test_bf16_factors_agree_with_float32(target):
    """Under bf16 autocast (its forward and backward; the factor products stay float32) the factors are within 3%
    (relative Frobenius) of float32's."""
    pm, examples, pad_id, _ = _solver(target, "continue")
    positions = list(range(len(examples)))
    full, low = (factor_sums(pm, examples, positions, pad_id, batch_size=8, precision=p) for p in ("fp32", "bf16"))
    assert full["tokens"] == low["tokens"]
    for key in (k for k in full if k.startswith(("x.", "d."))):
        assert float((low[key] - full[key]).norm() / full[key].norm()) < 0.03, key


def test_factors_over_a_subset_are_those_of_its_examples(target, tmp_path):
    """`newton_factor_examples`: the stored factor parts over a fixed draw of positions equal per-example autograd's
    over exactly those examples."""
    pm, examples, pad_id, _ = _solver(target, "continue")
    positions = factor_positions(len(examples), 12, seed=3)
    assert len(set(positions)) == 12 and positions == factor_positions(len(examples), 12, seed=3)
    assert factor_positions(len(examples), 0, seed=3) == list(range(len(examples)))
    sums = stored_factor_sums(pm, examples, pad_id, tmp_path / "f", process_index=0, num_processes=1, batch_size=8,
                              precision="fp32", positions=positions)
    solver = NewtonSolver(pm, examples, pad_id, batch_size=8, precision="fp32", damping=0.1, gamma=1.0, sums=sums)
    truth = _brute_force_factors(pm, [examples[i] for i in positions], pad_id)
    for f, (a, s) in zip(solver.factors, truth, strict=True):
        torch.testing.assert_close(f.inputs, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
        torch.testing.assert_close(f.output_grads, s, rtol=1e-4, atol=1e-5 * float(s.abs().max()))


def test_calibration_sets_the_training_loss_ratio(target):
    pm, examples, pad_id, solver = _solver(target, "continue")
    delta = solver.direction(torch.linspace(-1, 1, len(examples)), list(range(len(examples))))
    probe = list(range(16))
    solver.calibrate(delta, probe, 1.10)
    base = evaluate_signal(pm.model, [examples[i] for i in probe], pad_id).mean()
    solver.apply(delta, 1.0)
    moved = evaluate_signal(pm.model, [examples[i] for i in probe], pad_id).mean()
    assert float(moved / base) == pytest.approx(1.10, abs=0.01)


def test_step_length_is_calibrated_on_the_training_set(target, tmp_path, monkeypatch):
    """`newton_calibration: training_set`: after the probe's estimate, the step of perturbation 0 raises the mean
    training loss over every example by `newton_loss_ratio` (to 10% of the excess)."""
    from llm_attr.methods import daunce_newton
    from llm_attr.methods.daunce import perturbation_plan

    monkeypatch.setattr(daunce_newton, "PROBE_EXAMPLES", 4)  # a probe far smaller than the 32 examples
    pm, examples, pad_id, _ = _solver(target, "continue")
    cfg = DaunceConfig(perturbations=2, newton_loss_ratio=1.2, batch_size=8, precision="fp32", head_top_k=0)
    plan = perturbation_plan(cfg.seed, 0, len(examples), cfg.subsample_ratio)
    pm.reset(plan.init_seed)
    solver, scale = daunce_newton.newton_solver(pm, examples, pad_id, cfg, plan, tmp_path / "f", 0, 1)
    base = evaluate_signal(pm.model, examples, pad_id).mean()
    solver.apply(solver.direction(solver.coefficients(cfg, plan.xi), plan.subset.tolist()), scale)
    ratio = float(evaluate_signal(pm.model, examples, pad_id).mean() / base)
    assert ratio == pytest.approx(1.2, abs=0.02), ratio


@pytest.mark.parametrize("mode", ["new", "continue"])
def test_antithetic_rows_are_half_differences_and_query_reproduces_them(target, mode, tmp_path):
    """Each stored row is (ℓ(θ₀ + δ_k) − ℓ(θ₀ − δ_k)) / 2, and `query_run` recomputes the queries' rows from the
    kept adapters (θ₀ + δ_k and its mirror)."""
    cfg = DaunceConfig(perturbations=2, solver="newton", antithetic=True, adapter=mode, max_length=64,
                       measure="cov", signal="loss", lora=LoraArgs(rank=4, alpha=8.0, layers=2),
                       head_top_k=0)  # rows from the full head, as peft computes them here
    out = tmp_path / "run"
    Daunce(cfg).run(str(target.run), target.train, target.query, out)
    shard = load_file(str(out / "shards" / f"{shard_name(1)}.safetensors"))
    assert shard["train_loss_even"].mean() > 0
    net, tok = load_target(str(target.run), mode, "cpu")
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    theta0 = {n: v.clone() for n, v in get_peft_model_state_dict(net).items()} if mode == "continue" else None
    base = net if mode == "new" else net.unload()
    model = PeftModel.from_pretrained(base, str(adapter_dir(out, 1)))
    kept = load_file(str(adapter_dir(out, 1) / "adapter_model.safetensors"))
    mirror = ({n: -v if "lora_B" in n else v for n, v in kept.items()} if mode == "new"
              else {n: 2 * theta0[n] - v for n, v in kept.items()})
    examples, _ = tokenize_records(list(load_records(target.train)), tok, 64)
    plus = evaluate_signal(model, examples, pad_id_of(tok))
    set_peft_model_state_dict(model, mirror)
    minus = evaluate_signal(model, examples, pad_id_of(tok))
    torch.testing.assert_close(shard["train_loss"], (plus - minus) / 2, rtol=1e-3, atol=1e-5)
    q = query_run(out, target.query, tmp_path / "q")
    torch.testing.assert_close(load_file(str(tmp_path / "q" / "scores.safetensors"))["scores"],
                               load_file(str(out / "scores.safetensors"))["scores"], rtol=1e-3, atol=1e-6)
    assert q is not None


def test_config_rules():
    with pytest.raises(ValueError, match="antithetic"):
        DaunceConfig(antithetic=True, solver="adamw")  # a trained perturbation has no exact mirror
    with pytest.raises(ValueError, match="solver"):
        DaunceConfig(solver="lbfgs")
    with pytest.raises(ValueError, match=r"newton_kernel must be one of \['step', 'influence'\], got 'exact'"):
        DaunceConfig(newton_kernel="exact")  # every Literal field is checked from its annotation (Python API)
    with pytest.raises(ValueError, match="quantile in"):
        DaunceConfig(newton_damping=2.0)  # the default rule reads it as a quantile
    assert DaunceConfig(newton_damping=2.0, newton_damping_rule="mean").newton_damping == 2.0


def test_factor_parts_add_up_and_a_rerun_reads_them(target, tmp_path, monkeypatch):
    """Disjoint parts of the K-FAC sums add up to the whole; a re-run with more perturbations reads the stored
    part instead of recomputing it, and its first shards are unchanged."""
    from llm_attr.methods import daunce_newton

    pm, examples, pad_id, solver = _solver(target, "continue")
    n = len(examples)
    kw = dict(batch_size=8, precision="fp32")
    whole = daunce_newton.factor_sums(pm, examples, list(range(n)), pad_id, **kw)
    halves = [daunce_newton.factor_sums(pm, examples, list(range(r, n, 2)), pad_id, **kw) for r in (0, 1)]
    for key, value in whole.items():
        torch.testing.assert_close(halves[0][key] + halves[1][key], value, rtol=1e-4,
                                   atol=1e-5 * float(value.abs().max()))  # float32 batch products
    cfg = dict(solver="newton", adapter="continue", max_length=64, keep_adapters=False,
               lora=LoraArgs(rank=4, alpha=8.0))
    out = tmp_path / "run"
    Daunce(DaunceConfig(perturbations=2, **cfg)).run(str(target.run), target.train, target.query, out)
    first = load_file(str(out / "shards" / f"{shard_name(1)}.safetensors"))
    assert len(list((out / "newton_factors").glob("part-*-of-008.safetensors"))) == 8

    def refuse(*args, **kwargs):
        raise AssertionError("the factors were recomputed")

    monkeypatch.setattr(daunce_newton, "factor_sums", refuse)
    more = Daunce(DaunceConfig(perturbations=3, **cfg))
    more.run(str(target.run), target.train, target.query, out)
    assert more.computed == [2]
    torch.testing.assert_close(load_file(str(out / "shards" / f"{shard_name(1)}.safetensors"))["train_loss"],
                               first["train_loss"])


def test_adapter_auto_continues_a_lora_target_and_perturbs_a_whole_model_anew(target):
    from llm_attr.methods.daunce import resolved_adapter

    assert resolved_adapter("auto", str(target.run)) == "continue"  # a run directory: base + its LoRA adapter
    assert resolved_adapter("auto", "builtin:tiny") == "new"  # a whole model: a fresh adapter on it
    assert resolved_adapter("new", str(target.run)) == "new"


def test_continue_on_the_last_layers_moves_only_them_and_its_rows_are_the_adapters_losses(target, tmp_path):
    """`adapter: continue` with `lora.layers: 1` steps only the target's LoRA weights in the last decoder layer (the
    layer below keeps the target's weights, so the frozen-prefix cache applies), and each stored row is the loss
    of the saved adapter computed by peft from the embeddings up, without the cache."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from llm_attr.models.prefix_cache import first_trainable_layer

    pm, _, _, solver = _solver(target, "continue")
    net, tok = load_target(str(target.run), "continue", "cpu")
    last = PerturbationModel(net, "continue", LoraArgs(rank=4, alpha=8.0, layers=1))
    assert first_trainable_layer(last.model) == 1
    assert set(last.trainable) == {n for n in pm.trainable if ".layers.1." in n} and last.trainable
    cfg = DaunceConfig(perturbations=2, solver="newton", adapter="continue", max_length=64, measure="cov",
                       signal="loss", lora=LoraArgs(rank=4, alpha=8.0, layers=1), head_top_k=0)
    out = tmp_path / "run"
    Daunce(cfg).run(str(target.run), target.train, target.query, out)
    theta0 = {n: v.clone() for n, v in get_peft_model_state_dict(net).items()}
    examples, _ = tokenize_records(list(load_records(target.train)), tok, 64)
    model = None
    for k in range(2):
        kept = load_file(str(adapter_dir(out, k) / "adapter_model.safetensors"))
        for n, v in kept.items():
            moved = not torch.equal(v, theta0[n])
            assert moved == (".layers.1." in n), n
        model = PeftModel.from_pretrained((model or net).unload(), str(adapter_dir(out, k)))
        shard = load_file(str(out / "shards" / f"{shard_name(k)}.safetensors"))
        torch.testing.assert_close(shard["train_loss"], evaluate_signal(model, examples, pad_id_of(tok)),
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- the reduced lm_head (reduced_head.py)


def _setup(target, top_k):
    net, tok = load_target(str(target.run), "continue", "cpu")
    pm = PerturbationModel(net, "continue", LoraArgs(rank=4, alpha=8.0))
    examples, _ = tokenize_records(list(load_records(target.train)), tok, 64)
    pad = pad_id_of(tok)
    head = reduced_head(pm.model, examples, pad, top_k=top_k, batch_size=8, reference=pm.reference)
    assert head is not None and head.mean_tail_mass > 1e-4  # top_k small enough for the tail to matter
    return pm, examples, pad, head


def _grads(pm, examples, pad, head):
    pm.model.zero_grad()
    batch = collate(examples[:12], pad)
    keep = response_window(batch["labels"])
    logits, labels = window_logits(pm.model, batch, keep, head)
    per_example_loss(logits, labels).sum().backward()
    out = {n: p.grad.clone() for n, p in pm.trainable.items()}
    pm.model.zero_grad()
    return out


def test_exact_at_theta0_and_second_order_away_from_it(target):
    pm, examples, pad, head = _setup(target, top_k=3)
    for signal in ("loss", "margin"):
        torch.testing.assert_close(evaluate_signal(pm.model, examples, pad, signal=signal, head=head),
                                   evaluate_signal(pm.model, examples, pad, signal=signal), rtol=1e-4, atol=1e-4)
    full, reduced = _grads(pm, examples, pad, None), _grads(pm, examples, pad, head)
    for n in full:  # the tail logit's gradient in h is the tail's softmax-weighted rows of W: exact
        torch.testing.assert_close(reduced[n], full[n], rtol=1e-4, atol=1e-6 * float(full[n].abs().max()))
    start = {n: p.detach().clone() for n, p in pm.trainable.items()}
    direction = {n: torch.randn_like(p) * p.detach().abs().mean() for n, p in pm.trainable.items()}
    base = evaluate_signal(pm.model, examples, pad)
    errors, changes = [], []
    for c in (0.2, 0.1):
        with torch.no_grad():
            for n, p in pm.trainable.items():
                p.copy_(start[n] + c * direction[n])
        exact = evaluate_signal(pm.model, examples, pad)
        errors.append(float((evaluate_signal(pm.model, examples, pad, head=head) - exact).abs().mean()))
        changes.append(float((exact - base).abs().mean()))
    assert errors[0] < 0.1 * changes[0]  # small against the rows' own change
    assert errors[1] < 0.4 * errors[0]  # and second order: halving the step quarters it (up to float noise)


def test_daunce_scores_match_the_full_vocabulary(target, tmp_path):
    """A newton Daunce run with the reduced head (top 64 of 1,024 tokens; this barely trained target leaves 4.5% of
    the probability in the tail) scores as the full-vocabulary run does."""
    scores = {}
    for top_k in (0, 64):
        cfg = DaunceConfig(perturbations=4, adapter="continue", max_length=64, measure="cov", signal="loss",
                           keep_adapters=top_k > 0, head_top_k=top_k, lora=LoraArgs(rank=4, alpha=8.0))
        Daunce(cfg).run(str(target.run), target.train, target.query, tmp_path / f"top{top_k}")
        scores[top_k] = load_file(str(tmp_path / f"top{top_k}" / "scores.safetensors"))["scores"]
    corr = torch.corrcoef(torch.stack([scores[0].flatten(), scores[64].flatten()]))[0, 1]
    assert corr > 0.97, corr  # measured 0.98 (top 256: 0.998); the calibrated step lengths differ by 6%
    query_run(tmp_path / "top64", target.query, tmp_path / "q")  # `llm-attr query` rebuilds the same head
    torch.testing.assert_close(load_file(str(tmp_path / "q" / "scores.safetensors"))["scores"], scores[64],
                               rtol=1e-3, atol=1e-6)
