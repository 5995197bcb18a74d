"""Per-example gradients, LoGra projection and preconditioners against brute force on tiny models.

The oracle is plain autograd, one example at a time; preconditioners are checked against explicit dense algebra
(torch.linalg.solve on F + λI, Kronecker products built with torch.kron).
"""

from __future__ import annotations

import copy

import pytest
import torch

from llm_attr.data.math_task import make_math
from llm_attr.data.records import as_records
from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
from llm_attr.losses import model_inputs, per_example_loss
from llm_attr.methods.gradients import GradientError, GradientExtractor, KroneckerFactors
from llm_attr.methods.preconditioners import (
    EKFAC,
    KFAC,
    Cosine,
    DampedFisher,
    Preconditioner,
    score,
    tracin_scores,
)
from llm_attr.models.loading import load_model
from llm_attr.models.lora import LoraArgs, attach_lora

ATOL = 1e-6


# ---------------------------------------------------------------- fixtures and oracle


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(frozen base model, tokenizer, 8 tokenised math examples, pad id)."""
    loaded = load_model("builtin:tiny", device="cpu", dtype="float32")
    examples, _ = tokenize_records(as_records(make_math(8, seed=1)), loaded.tokenizer, max_length=128)
    return loaded.model.requires_grad_(False).eval(), loaded.tokenizer, examples, pad_id_of(loaded.tokenizer)


def with_lora(base, seed: int = 0, **lora) -> torch.nn.Module:
    """A copy of `base` with a LoRA adapter whose B is small and random (so gradients w.r.t. A are nonzero)."""
    model = attach_lora(copy.deepcopy(base), LoraArgs(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def lora_model(tiny):
    return with_lora(tiny[0], rank=4)


def brute_force(model, extractor: GradientExtractor, examples, pad_id) -> torch.Tensor:
    """`[N, d]`: each example alone, plain autograd on the tracked weights, flattened as `[out, in]` blocks."""
    layers = extractor.layers
    weights = [layer.module.weight for layer in layers]
    flags = [w.requires_grad for w in weights]
    rows = []
    try:
        for w in weights:
            w.requires_grad_(True)
        for e in examples:
            batch = collate([e], pad_id)
            loss = per_example_loss(model(**model_inputs(batch)).logits, batch["labels"])[0]
            grads = torch.autograd.grad(loss, weights)
            flat = [(g.T if t.transposed else g).reshape(-1) for g, t in zip(grads, layers, strict=True)]
            rows.append(torch.cat(flat))  # Conv1D weights are [in, out]: report [out, in]
    finally:
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
    return torch.stack(rows)


def explicit_projection(
    exact: torch.Tensor, exact_ext: GradientExtractor, proj_ext: GradientExtractor
) -> torch.Tensor:
    """vec(P_out G P_inᵀ) per layer from explicit gradients `[N, d_exact]`, with `proj_ext`'s matrices."""
    out = []
    for block, layer in zip(exact_ext.layer_blocks, proj_ext.layers, strict=True):
        g = exact[:, block.start : block.stop].reshape(-1, block.out_dim, block.in_dim)
        if layer.p_out is not None:
            g = layer.p_out @ g
        if layer.p_in is not None:
            g = g @ layer.p_in.T
        out.append(g.reshape(g.shape[0], -1))
    return torch.cat(out, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- exact per-example gradients


def test_exact_gradients_and_grad_dot_match_autograd_one_example_at_a_time(tiny, lora_model):
    _, _, examples, pad = tiny
    ext = GradientExtractor(lora_model, projection_rank=0)
    assert all("lora_" in layer.name for layer in ext.layers) and len(ext.layers) == 2 * 7 * 2
    grads = ext.per_example(collate(examples, pad))
    expected = brute_force(lora_model, ext, examples, pad)
    assert grads.shape == (len(examples), ext.dim) and grads.dtype == torch.float32
    assert ext.layer_blocks[-1].stop == ext.dim
    assert torch.allclose(grads, expected, atol=ATOL, rtol=1e-4)
    assert expected.abs().max() > 1e-3  # both A and B receive real gradients
    a_block = ext.layer_blocks[0]
    assert "lora_A" in a_block.name and grads[:, a_block.start : a_block.stop].abs().max() > 1e-4
    assert torch.allclose(score(grads, grads), expected @ expected.T, atol=1e-5, rtol=1e-4)
    losses = per_example_loss(
        lora_model(**model_inputs(collate(examples, pad))).logits, collate(examples, pad)["labels"]
    )
    assert torch.allclose(ext.last_losses, losses.detach(), atol=1e-6)


def test_batch_size_padding_side_and_order_do_not_change_gradients(tiny, lora_model):
    _, _, examples, pad = tiny
    assert len({len(e.input_ids) for e in examples}) > 1  # padding really happens
    ext = GradientExtractor(lora_model, projection_rank=8)
    alone = torch.cat([ext.per_example(collate([e], pad)) for e in examples])
    right = ext.per_example(collate(examples, pad))
    left = ext.per_example(collate(examples, pad, padding_side="left"))
    pairs = torch.cat(
        [ext.per_example(collate(examples[i : i + 2], pad)) for i in range(0, len(examples), 2)]
    )
    reverse = ext.per_example(collate(examples[::-1], pad)).flip(0)
    for got in (right, left, pairs, reverse):
        assert torch.allclose(got, alone, atol=ATOL, rtol=1e-4)


def test_frozen_linear_layers_by_name_pattern(tiny):
    base, _, examples, pad = tiny
    ext = GradientExtractor(base, params=r"layers\.1\.mlp\.(up|down)_proj$", projection_rank=0)
    assert [layer.name.rsplit(".", 1)[-1] for layer in ext.layers] == ["up_proj", "down_proj"]
    assert not any(
        p.requires_grad for p in base.parameters()
    )  # nothing trainable: hooks still give gradients
    grads = ext.per_example(collate(examples[:4], pad))
    assert torch.allclose(grads, brute_force(base, ext, examples[:4], pad), atol=ATOL, rtol=1e-4)
    assert not any(p.requires_grad for p in base.parameters())
    lora = with_lora(base, rank=2)
    with lora.disable_adapter(), pytest.raises(GradientError, match="not called"):
        GradientExtractor(lora, projection_rank=0).per_example(collate(examples[:2], pad))
    with pytest.raises(GradientError, match="no nn.Linear"):
        GradientExtractor(base, params="no_such_module")
    with pytest.raises(GradientError, match="LoRA"):
        GradientExtractor(base, params="lora")


# ---------------------------------------------------------------- LoGra projection


@pytest.mark.parametrize("projection", ["gaussian", "pca"])
def test_kronecker_projection_equals_projecting_explicit_gradients(tiny, lora_model, projection):
    _, _, examples, pad = tiny
    exact_ext = GradientExtractor(lora_model, projection_rank=0)
    exact = exact_ext.per_example(collate(examples, pad))
    ext = GradientExtractor(lora_model, projection_rank=16, projection=projection, seed=3)
    if projection == "pca":
        with pytest.raises(GradientError, match="fit_projection"):
            ext.per_example(collate(examples, pad))
        halves = [collate(examples[:4], pad), collate(examples[4:], pad)]
        ext.fit_projection(halves)
        merged = ext.covariances(halves[:1]).merge(
            ext.covariances(halves[1:])
        )  # as gathered from two processes
        twin = GradientExtractor(lora_model, projection_rank=16, projection="pca").fit_projection(merged)
        for key, p in ext.state_dict().items():  # same subspaces (eigenvector signs aside)
            assert torch.allclose(p.T @ p, twin.state_dict()[key].T @ twin.state_dict()[key], atol=1e-4), key
    projected = ext.per_example(collate(examples, pad))
    a = next(layer for layer in ext.layers if "lora_A" in layer.name)
    assert a.p_in.shape == (16, 128) and a.p_out is None  # the rank-4 side stays exact
    assert projected.shape == (len(examples), ext.dim) and ext.dim < exact_ext.dim
    assert torch.allclose(projected, explicit_projection(exact, exact_ext, ext), atol=ATOL, rtol=1e-4)
    if projection == "pca":  # orthonormal rows spanning the top input directions
        assert torch.allclose(a.p_in @ a.p_in.T, torch.eye(16), atol=1e-5)
    # seeded: a second extractor has the same projections; the state round-trips
    twin = GradientExtractor(lora_model, projection_rank=16, projection=projection, seed=3)
    twin.load_state_dict(ext.state_dict())
    assert torch.equal(twin.per_example(collate(examples, pad)), projected)


def test_projected_inner_products_approach_exact_ones_as_rank_grows(tiny, lora_model):
    _, _, examples, pad = tiny
    batch = collate(examples, pad)
    exact = GradientExtractor(lora_model, projection_rank=0).per_example(batch)
    gram = exact @ exact.T
    errors = []
    for rank in (4, 16, 64):
        errs = []
        for seed in range(3):
            g = GradientExtractor(lora_model, projection_rank=rank, seed=seed).per_example(batch)
            errs.append(rel_err(g @ g.T, gram))
        errors.append(sum(errs) / len(errs))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0] and errors[2] < 0.25, errors
    full = GradientExtractor(lora_model, projection_rank=256).per_example(
        batch
    )  # every side fits: no projection
    assert torch.allclose(full, exact, atol=ATOL)


# ---------------------------------------------------------------- preconditioners


def test_if_fisher_at_full_dimension_equals_dense_solve(tiny):
    base, _, examples, pad = tiny
    model = with_lora(base, rank=2, target_modules=["v_proj"])
    ext = GradientExtractor(model, projection_rank=0)
    assert ext.dim == 2 * (2 * 128 * 2)  # two layers' v_proj, A [2, 128] and B [128, 2]
    train, query = examples[:6], examples[6:]
    g_train = ext.per_example(collate(train, pad)).double()
    g_query = ext.per_example(collate(query, pad)).double()
    bf_train, bf_query = (
        brute_force(model, ext, train, pad).double(),
        brute_force(model, ext, query, pad).double(),
    )
    fisher = bf_train.T @ bf_train / len(train)
    lam = 0.1 * torch.trace(fisher) / ext.dim  # default damping: 0.1 x mean eigenvalue
    expected = torch.linalg.solve(fisher + lam * torch.eye(ext.dim, dtype=torch.float64), bf_query.T).T
    fitted = DampedFisher().fit(g_train.split(4))  # chunks, as from store shards
    assert fitted.lam == pytest.approx(float(lam), rel=1e-4)
    got = fitted.apply(g_query)
    assert rel_err(got, expected) < 1e-6
    scores = score(g_query, g_train, fitted)
    assert torch.allclose(
        scores, (expected @ bf_train.T).float(), rtol=1e-3, atol=1e-3 * float(scores.abs().max())
    )
    absolute = DampedFisher(damping=0.5).fit(g_train)
    assert absolute.lam == 0.5
    expected_abs = torch.linalg.solve(fisher + 0.5 * torch.eye(ext.dim, dtype=torch.float64), bf_query.T).T
    assert rel_err(absolute.apply(g_query), expected_abs) < 1e-4


@pytest.fixture(scope="module")
def single_layer(tiny):
    """A frozen 128 x 128 projection layer, LoGra-projected to 12 x 12: (extractor, train grads, factors, query)."""
    base, _, examples, pad = tiny
    ext = GradientExtractor(base, params=r"layers\.1\.self_attn\.o_proj$", projection_rank=12, seed=1)
    factors = KroneckerFactors()
    train = torch.cat([ext.per_example(collate(examples[i : i + 3], pad), factors) for i in (0, 3)])
    query = ext.per_example(collate(examples[6:], pad))
    return ext, train, factors, query


def test_kfac_factors_are_projected_input_and_output_gradient_covariances(tiny, single_layer):
    base, _, examples, pad = tiny
    ext, train, factors, _ = single_layer
    (layer,) = ext.layers
    assert factors.n_examples == 6 and factors.n_tokens == sum(len(e.input_ids) for e in examples[:6])
    inputs = []
    handle = layer.module.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    with torch.no_grad():
        for e in examples[:6]:
            base(**model_inputs(collate([e], pad)))
    handle.remove()
    x = torch.cat([v[0] for v in inputs]) @ layer.p_in.T  # [tokens, 12]
    a, s = factors.covariances(layer.name)
    assert torch.allclose(a, (x.T @ x).double() / x.shape[0], rtol=1e-4, atol=1e-6)
    assert s.shape == (12, 12) and torch.allclose(s, s.T) and torch.linalg.eigvalsh(s).min() > -1e-10
    state = factors.state_dict()
    assert torch.equal(KroneckerFactors.from_state_dict(state).covariances(layer.name)[0], a)


def test_kfac_single_layer_equals_explicit_kronecker_inverse(single_layer):
    ext, _, factors, query = single_layer
    (block,) = ext.layer_blocks
    a, s = factors.covariances(block.name)
    kron = torch.kron(s, a)  # acts on the row-major vec of G [out, in]: vec(S G A) = (S ⊗ A) vec(G)
    lam = 0.1 * float(torch.linalg.eigvalsh(kron).mean())
    expected = torch.linalg.solve(
        kron + lam * torch.eye(kron.shape[0], dtype=torch.float64), query.double().T
    ).T
    kfac = KFAC(ext.layer_blocks).fit(factors)
    assert kfac.lam[block.name] == pytest.approx(lam, rel=1e-6)
    assert rel_err(kfac.apply(query.double()), expected) < 1e-8
    assert rel_err(kfac.apply(query), expected) < 1e-4  # float32 in, float32 out
    restored = KFAC(ext.layer_blocks)
    restored.load_state_dict(kfac.state_dict())
    assert torch.equal(restored.apply(query), kfac.apply(query))


def test_ekfac_single_layer_equals_explicit_corrected_eigenbasis(single_layer):
    ext, train, factors, query = single_layer
    (block,) = ext.layer_blocks
    a, s = factors.covariances(block.name)
    q = torch.kron(torch.linalg.eigh(s).eigenvectors, torch.linalg.eigh(a).eigenvectors)
    corrected = ((train.double() @ q) ** 2).mean(
        0
    )  # second moment of training gradients in the K-FAC eigenbasis
    lam = 0.1 * float(corrected.mean())
    expected = ((query.double() @ q) / (corrected + lam)) @ q.T
    ekfac = EKFAC(ext.layer_blocks).fit(factors, train.split(4))
    assert rel_err(ekfac.apply(query.double()), expected) < 1e-8
    assert EKFAC(ext.layer_blocks, damping=1e-3).fit(factors, train).lam[block.name] == 1e-3


def test_grad_cos_and_tracin(tiny, lora_model):
    base, _, examples, pad = tiny
    batch = collate(examples, pad)
    g1 = GradientExtractor(lora_model, projection_rank=16).per_example(batch)
    cos = score(g1[:3], g1, Cosine())
    assert torch.allclose(
        cos, torch.nn.functional.cosine_similarity(g1[:3, None], g1[None], dim=-1), atol=1e-6
    )
    assert torch.allclose(cos[:, :3].diagonal(), torch.ones(3))
    second = with_lora(base, seed=7, rank=4)  # another "checkpoint": the same adapter shape, other weights
    g2 = GradientExtractor(second, projection_rank=16).per_example(batch)
    got = tracin_scores([g1[:3], g2[:3]], [g1, g2], [1e-3, 5e-4])
    assert torch.allclose(got, 1e-3 * g1[:3] @ g1.T + 5e-4 * g2[:3] @ g2.T, rtol=1e-5, atol=1e-9)
    assert torch.equal(score(g1[:3], g1, Preconditioner()), score(g1[:3], g1))


def test_sign_convention_positive_score_means_training_on_it_lowers_the_query_loss(tiny):
    base, _, examples, pad = tiny
    model = with_lora(base, rank=4)
    ext = GradientExtractor(model, projection_rank=0)
    grads = ext.per_example(collate(examples, pad))
    scores = score(grads[:4], grads[4:])
    q, j = divmod(int(scores.abs().argmax()), scores.shape[1])
    query = collate([examples[q]], pad)

    def query_loss() -> float:
        with torch.no_grad():
            return float(per_example_loss(model(**model_inputs(query)).logits, query["labels"])[0])

    before, lr = query_loss(), 1e-3
    with torch.no_grad():  # one SGD step on training example j alone
        for block, layer in zip(ext.layer_blocks, ext.layers, strict=True):
            layer.module.weight -= lr * grads[4 + j, block.start : block.stop].reshape(
                layer.module.weight.shape
            )
    change = before - query_loss()  # > 0: training on j lowered the query's loss, i.e. j helps q
    assert change * float(scores[q, j]) > 0
    assert change == pytest.approx(lr * float(scores[q, j]), rel=0.1)


# ---------------------------------------------------------------- GPT-2 Conv1D (weights stored [in, out])


def test_gpt2_conv1d_layers_and_lora_on_them(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok, examples, pad = tiny
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    ext = GradientExtractor(model, params=r"h\.\d\.(attn\.c_attn|mlp\.c_fc)$", projection_rank=0)
    assert [layer.transposed for layer in ext.layers] == [True] * 4
    assert (ext.layers[0].in_features, ext.layers[0].out_features) == (32, 96)
    grads = ext.per_example(collate(examples[:5], pad))
    exact_expected = brute_force(model, ext, examples[:5], pad)
    assert torch.allclose(grads, exact_expected, atol=ATOL, rtol=1e-4)
    proj = GradientExtractor(model, params=r"h\.\d\.(attn\.c_attn|mlp\.c_fc)$", projection_rank=8)
    assert torch.allclose(
        proj.per_example(collate(examples[:5], pad)),
        explicit_projection(grads, ext, proj),
        atol=ATOL,
        rtol=1e-4,
    )
    peft_model = with_lora(model, rank=2)  # peft with fan_in_fan_out over Conv1D; lora_A/B are nn.Linear
    lora_ext = GradientExtractor(peft_model, projection_rank=0)
    assert (
        len(lora_ext.layers) == 2 * 4 * 2
    )  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; A and B
    assert torch.allclose(
        lora_ext.per_example(collate(examples[:5], pad)),
        brute_force(peft_model, lora_ext, examples[:5], pad),
        atol=ATOL,
        rtol=1e-4,
    )


def test_if_fisher_refuses_a_matrix_that_does_not_fit_in_one_line(monkeypatch):
    """Before allocating: a dense Fisher larger than the free memory is refused with the sizes and the way out
    (it was killed by the OOM killer on SmolLM2's 43k-dimensional exact LoRA gradients)."""
    from llm_attr.methods import preconditioners

    monkeypatch.setattr(preconditioners, "_available_bytes", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(preconditioners.GradientError, match=r"1024 x 1024 .* GiB .* if-kfac / if-ekfac"):
        preconditioners.DampedFisher().update(torch.randn(4, 1024))
    monkeypatch.setattr(preconditioners, "_available_bytes", lambda device: None)  # unknown: it tries
    preconditioners.DampedFisher().update(torch.randn(4, 1024))
