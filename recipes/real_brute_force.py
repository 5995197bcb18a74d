"""Brute-force influence on a real model's LoRA, exactly, against Daunce and the gradient methods.

    python recipes/real_brute_force.py --work runs/brute                       # every stage, resumable
    python recipes/real_brute_force.py --work runs/brute_tiny --model builtin:tiny --k 32 --k-new 32  # quick
    python recipes/real_brute_force.py --work runs/brute --stop-after brute    # data, target, exact H only

Which part of Daunce's error is noise and which is bias? On logistic regression the test
`test_daunce_converges_to_brute_force_influence` (tests/test_daunce.py) answers it exactly; here the same question
on SmolLM2-135M-Instruct (default), with a LoRA small enough for the exact Hessian:

1. data: `--n-train` one-step MATH records (`llm_attr.data.math_task`, short `\\boxed{}` answers) and `--n-query`
   held-out queries (WORK/train.jsonl, WORK/query.jsonl).
2. target θ₀: a rank-1 LoRA on the last decoder layer's `v_proj` only (`TARGET`, `--target-set` overrides), trained
   to near convergence (P = 768 trainable parameters on SmolLM2).
3. brute force (WORK/brute/): the exact Hessian H (P x P) of the mean training loss (mean token NLL over response
   tokens, `llm_attr.losses`) at θ₀, its Gauss-Newton part (logit-space GGN), the per-example gradients g_j and
   query gradients g_q; I(q, j) = g_qᵀ (C + λI)⁻¹ g_j, C = H, |H| or the GGN (`--curvature`), λ = `--damping`
   x the mean eigenvalue. Exact and affordable because a `v_proj` LoRA leaves the last layer's attention weights
   alone: the states entering that layer and its attention pattern are taken from one forward pass per example,
   and each response position's loss is then an explicit function of θ through the layer's value path, MLP, norm
   and lm_head (checked against the model's logits, gradients and a Hessian-vector product through the whole
   peft model in float64). Each position's Jacobian ∂u/∂θ (u: the attention heads' output) has rank 198 of 576
   on SmolLM2 (192 + 9 − 3: B's columns, one A direction per head, three of them inside B's span), so the
   lm_head term is computed in that subspace: 4x fewer multiply-adds through the 49k vocabulary (~8 min for
   676 response positions on one shared CPU core).
4. methods: Daunce (configs/daunce.yaml) with `adapter=continue` (it perturbs exactly the P target parameters,
   adapters kept) up to `--k` perturbations and with its default `adapter=new` (fresh rank-64 LoRA on the last 4
   layers) up to `--k-new`; exact-gradient grad-dot, grad-cos, if-fisher, if-kfac, if-ekfac (one gradient run).
5. report (WORK/results.json, a markdown table): per method (Daunce: signal x measure x K = 8 ... 256) the mean
   over queries of Spearman and Pearson against brute force, Daunce's split-half reliability and the ceiling it
   implies; for `adapter=continue` the decomposition of its error: linearisation (ℓ_j(θ_k) − ℓ_j(θ₀) against
   g_jᵀ(θ_k − θ₀)), the kernel g_qᵀ Σ̂ g_j of the kept adapters' displacements, the K → ∞ limit of the
   perturbation covariance (simulated when each perturbation is a single optimiser step), and the kernel
   g_qᵀ H⁻¹ F H⁻¹ g_j that a perturbation trained to its minimiser would converge to.

Every stage re-uses what an earlier, possibly killed, run finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study import ROOT, build_target, load_scores  # noqa: E402

from llm_attr.config import load_config, parse_overrides  # noqa: E402
from llm_attr.data.records import save_jsonl  # noqa: E402
from llm_attr.utils import setup_logging  # noqa: E402

logger = logging.getLogger("real_brute_force")

#: the target: rank-1 LoRA on the last layer's v_proj (P = 768 on SmolLM2), trained to near convergence
TARGET = {"epochs": 30.0, "learning_rate": 1e-2, "batch_size": 8, "max_length": 128, "warmup_ratio": 0.05,
          "lora": {"rank": 1, "alpha": 2.0, "layers": 1, "target_modules": ["v_proj"]}, "save_steps": 0}
#: Daunce variants: configs/daunce.yaml plus these keys (and --daunce-set)
VARIANTS = {"continue": ["adapter=continue", "keep_adapters=true", "max_length=128"],
            "new": ["keep_adapters=false", "max_length=128"]}
KS = (8, 16, 32, 64, 128, 256)
GRADIENT_SCORINGS = ("grad-dot", "grad-cos", "if-fisher", "if-kfac", "if-ekfac")
CURVATURES = ("hessian", "abs", "ggn")


def build_data(work: Path, n_train: int, n_query: int, seed: int) -> dict[str, Path]:
    from llm_attr.data.math_task import ONE_STEP, make_math

    paths = {"train": work / "train.jsonl", "query": work / "query.jsonl"}
    if not all(p.is_file() for p in paths.values()):
        records = make_math(n_train + n_query, seed=seed, templates=ONE_STEP)
        save_jsonl(records[:n_train], paths["train"])
        save_jsonl(records[n_train:], paths["query"])
    return paths


# ---------------------------------------------------------------------- brute force: exact H, g_j, g_q


class ValuePath:
    """The last decoder layer of a Llama-style model with a LoRA on its `v_proj` only, as explicit functions.

    A change of v_proj changes the values, not the attention weights α: at response position t with the layer's
    normed input y_s, head h's output is W_v^g ȳ_th + s·B_g A ȳ_th with ȳ_th = Σ_s α_hts y_s (g: h's key-value
    group), so `u_t(θ)` (the heads' output, concatenated) is bilinear in θ = (A, B) and the position's logits are
    `lm_head(norm(z + mlp(post_ln(z))))`, z = x_t + o_proj(u_t), x_t the residual entering the layer.
    """

    def __init__(self, model):
        import torch

        from llm_attr.models.prefix_cache import decoder_parts
        from llm_attr.runner import lora_layers

        self.model = model
        self.decoder, layers = decoder_parts(model)
        self.layer = layers[len(layers) - 1]
        loras = lora_layers(model)
        names = [n for n, m in model.named_modules() if m is (loras[0] if loras else None)]
        if len(loras) != 1 or not names[0].endswith("self_attn.v_proj") or loras[0] is not self.layer.self_attn.v_proj:
            raise SystemExit("brute force needs a target whose only LoRA module is the last layer's self_attn.v_proj "
                             f"(found {[n for n, m in model.named_modules() if m in loras]})")
        lora = loras[0]
        self.A, self.B = lora.lora_A["default"].weight, lora.lora_B["default"].weight  # [r, D], [G·hd, r]
        self.scale = float(lora.scaling["default"])
        base = lora.get_base_layer()
        attn = self.layer.self_attn
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn.head_dim
        self.rank = self.A.shape[0]
        group = torch.arange(self.n_heads) // (self.n_heads // self.n_kv)
        self.group = group
        wv = base.weight.detach().view(self.n_kv, self.head_dim, -1)
        self.wv = wv[group]  # [H, hd, D]
        bv = base.bias.detach().view(self.n_kv, self.head_dim)[group] if base.bias is not None else None
        self.bv = bv
        self.head_w = model.get_output_embeddings().weight.detach()  # [V, D]
        if model.get_output_embeddings().bias is not None:
            raise SystemExit("brute force: an lm_head with a bias is not supported")
        self.n_params = self.A.numel() + self.B.numel()

    def theta0(self):
        import torch

        return torch.cat([self.A.detach().reshape(-1), self.B.detach().reshape(-1)])

    def split(self, theta):
        r = self.rank
        a = theta[: self.A.numel()].view(r, -1)
        b = theta[self.A.numel():].view(self.n_kv, self.head_dim, r)[self.group]  # [H, hd, r]
        return a, b

    def u_of(self, theta, ybar):
        """heads' output `[M, H·hd]` at positions with ȳ `[M, H, D]`."""
        import torch

        a, b = self.split(theta)
        out = torch.einsum("hed,mhd->mhe", self.wv, ybar)
        out = out + self.scale * torch.einsum("her,mhr->mhe", b, torch.einsum("rd,mhd->mhr", a, ybar))
        if self.bv is not None:
            out = out + self.bv
        return out.reshape(ybar.shape[0], -1)

    def u_jacobian(self, theta, ybar):
        """∂u/∂θ `[M, H·hd, P]` at positions with ȳ `[M, H, D]` (u is bilinear in (A, B): written out)."""
        import torch

        a, b = self.split(theta)
        m, H, hd, r = ybar.shape[0], self.n_heads, self.head_dim, self.rank
        ja = self.scale * torch.einsum("her,mhd->mherd", b, ybar).reshape(m, H * hd, -1)
        coef = self.scale * torch.einsum("rd,mhd->mhr", a, ybar)  # [M, H, r]
        jb = torch.zeros(m, H, hd, self.n_kv, hd, r, dtype=ybar.dtype)
        idx = torch.arange(hd)
        for h in range(H):
            jb[:, h, idx, int(self.group[h]), idx, :] = coef[:, h, None, :]
        return torch.cat([ja, jb.reshape(m, H * hd, -1)], dim=-1)

    def h_of(self, u, x):
        """final-normed hidden `[..., D]` from heads' output u and residual x."""
        z = x + self.layer.self_attn.o_proj(u)
        z = z + self.layer.mlp(self.layer.post_attention_layernorm(z))
        return self.decoder.norm(z)

    def capture(self, example):
        """(x `[T, D]` entering the layer, ȳ `[T, H, D]`, logits `[T, V]`) of one example (fp32, no grad)."""
        import torch

        cap = {}

        def pre(_m, args, kwargs):
            cap["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post(_m, _args, _kwargs, out):
            cap["alpha"] = out[1]

        ids = torch.tensor([example.input_ids])
        h1 = self.layer.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = self.layer.self_attn.register_forward_hook(post, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits[0]
        finally:
            h1.remove()
            h2.remove()
        if cap.get("alpha") is None:
            raise SystemExit("brute force: the attention weights were not returned (eager attention needed)")
        x = cap["x"][0].detach()
        with torch.no_grad():
            y = self.layer.input_layernorm(x)  # [T, D]
            ybar = torch.einsum("hts,sd->thd", cap["alpha"][0].float(), y)
        return x, ybar, logits.float()


def positions_of(example):
    """(positions t predicting a response token, those tokens)."""
    t = [i for i in range(len(example.labels) - 1) if example.labels[i + 1] != -100]
    return t, [example.labels[i + 1] for i in t]


def brute_force(target: Path, paths: dict[str, Path], work: Path, chunk: int) -> Path:
    """WORK/brute/brute.safetensors: H, GGN, g_train, g_query (float64) at θ₀, plus θ₀'s rows; brute.json: checks."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from torch.func import hessian, jacfwd, jvp, vjp, vmap

    from llm_attr.data.records import load_records
    from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
    from llm_attr.losses import evaluate_signal, forward_logits, per_example_loss
    from llm_attr.runner import load_target

    out = work / "brute"
    if (out / "brute.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    model, tokenizer = load_target(str(target), "continue", "cpu", "float32")
    model.eval()
    pad = pad_id_of(tokenizer)
    train_ex, _ = tokenize_records(load_records(paths["train"]), tokenizer, 128)
    query_ex, _ = tokenize_records(load_records(paths["query"]), tokenizer, 128)
    # θ₀'s rows through the package's own evaluation (the path Daunce's rows take)
    rows0 = {f"{side}_{s}": v for side, ex in (("train", train_ex), ("query", query_ex))
             for s, v in evaluate_signal(model, ex, pad, signal=("loss", "margin")).items()}
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 (older transformers: the config attribute below does it)
            pass
    model.config._attn_implementation = "eager"
    vp = ValuePath(model)
    for p in model.parameters():
        p.requires_grad_(False)
    theta0 = vp.theta0()
    P, N = vp.n_params, len(train_ex)
    W = vp.head_w

    def capture_all(examples):
        items, err = [], 0.0
        for e in examples:
            x, ybar, logits = vp.capture(e)
            t, y = positions_of(e)
            t = torch.tensor(t)
            with torch.no_grad():  # the explicit function reproduces the model's logits
                mine = vp.h_of(vp.u_of(theta0, ybar[t]), x[t]) @ W.T
            err = max(err, float((mine - logits[t]).abs().max() / logits[t].abs().max()))
            items.append({"x": x[t], "ybar": ybar[t], "y": torch.tensor(y)})
        return items, err

    t0 = time.time()
    train_items, err_train = capture_all(train_ex)
    query_items, err_query = capture_all(query_ex)
    logger.info("captured the layer's inputs and attention of %d examples (%.1fs); explicit logits vs model: "
                "max rel. error %.1e", N + len(query_ex), time.time() - t0, max(err_train, err_query))

    def example_loss(theta, item):
        h = vp.h_of(vp.u_of(theta, item["ybar"]), item["x"])
        return F.cross_entropy(h @ W.T, item["y"])  # mean token NLL over the response

    def gradients(items):
        grads, losses = [], []
        for item in items:
            th = theta0.clone().requires_grad_(True)
            loss = example_loss(th, item)
            (g,) = torch.autograd.grad(loss, th)
            grads.append(g.double())
            losses.append(float(loss.detach()))
        return torch.stack(grads), torch.tensor(losses, dtype=torch.float64)

    g_train, loss_train = gradients(train_items)
    g_query, loss_query = gradients(query_items)

    # the exact Hessian of the mean training loss, position by position
    t0 = time.time()
    H = torch.zeros(P, P, dtype=torch.float64)
    G = torch.zeros(P, P, dtype=torch.float64)  # logit-space Gauss-Newton part
    R_res = torch.zeros(P, P, dtype=torch.float64)  # hidden-state curvature part (MLP, norms) of H
    m_acc = torch.zeros(vp.n_heads, vp.head_dim, vp.wv.shape[-1], dtype=torch.float64)
    ranks, asym = [], 0.0
    pos = [(i, j) for i, item in enumerate(train_items) for j in range(len(item["y"]))]
    for start in range(0, len(pos), chunk):
        part = pos[start:start + chunk]
        ybar = torch.stack([train_items[i]["ybar"][j] for i, j in part])
        xs = torch.stack([train_items[i]["x"][j] for i, j in part])
        ys = torch.tensor([int(train_items[i]["y"][j]) for i, j in part])
        coef = torch.tensor([1.0 / (N * len(train_items[i]["y"])) for i, _ in part], dtype=torch.float64)
        with torch.no_grad():
            ju = vp.u_jacobian(theta0, ybar)  # [c, Du, P]
            u0 = vp.u_of(theta0, ybar)
            if start == 0:  # the written-out Jacobian against autodiff's
                auto = jacfwd(lambda th, yb=ybar[:2]: vp.u_of(th, yb))(theta0)
                jac_err = float((auto - ju[:2]).abs().max() / auto.abs().max())
        for c in range(len(part)):
            J = ju[c].double()
            ev, vecs = torch.linalg.eigh(J @ J.T)
            keep = ev > ev[-1] * 1e-10  # singular values above 1e-5 of the largest: the column space of J
            Q = vecs[:, keep]
            Rm = Q.T @ J  # [k, P]: J = Q Rm
            Qf = Q.float()
            ranks.append(int(keep.sum()))
            x_c, u_c = xs[c], u0[c]

            def hn(u, x=x_c):
                return vp.h_of(u, x)

            with torch.no_grad():
                h0, Gh = vmap(lambda v, u=u_c: jvp(hn, (u,), (v,)))(Qf.T)  # [k, D] tangents of h along Q
                h0 = h0[0]
                logit = h0 @ W.T
                p64 = torch.softmax(logit.double(), -1)
                p = p64.float()
                Z = Gh @ W.T  # [k, V]: logit tangents (fp32 matmuls: the cost, 2 x V·D·k multiply-adds)
                Z -= (Z.double() @ p64).float()[:, None]  # centred under p: no cancellation at confident tokens
                ggn = ((Z * p) @ Z.T).double()  # Zᵀ(diag p − ppᵀ)Z
                e = p64.clone()
                e[ys[c]] -= 1.0  # p − e_y in float64 (p_y − 1 cancels in float32)
                e = W.T @ e.float()  # ∂ℓ/∂h
            res = hessian(lambda cc, e=e, u=u_c, Q=Qf: e @ hn(u + Q @ cc))(torch.zeros(Qf.shape[1])).double()
            _, pull = vjp(hn, u_c)
            lam = pull(e)[0].detach()  # ∂ℓ/∂u [Du]
            asym = max(asym, float((res - res.T).abs().max() / res.abs().max().clamp(min=1e-30)))
            res = (res + res.T) / 2
            w = float(coef[c])
            G += w * Rm.T @ ggn @ Rm
            R_res += w * Rm.T @ res @ Rm
            # bilinear part: Σ_t coef_t λ_t ⊗ ȳ_t per head (u's second derivative in θ)
            m_acc += w * torch.einsum("he,hd->hed", lam.view(vp.n_heads, vp.head_dim).double(), ybar[c].double())
        if start // chunk % 20 == 0:
            logger.info("Hessian: %d / %d response positions (%.0fs)", start + len(part), len(pos), time.time() - t0)

    m_f = m_acc.float()

    def bilinear(th):
        a, b = vp.split(th)
        return vp.scale * torch.einsum("her,hed,rd->", b, m_f, a)

    H_bil = hessian(bilinear)(theta0).double()
    H = G + R_res + H_bil
    asym_total = float((H - H.T).abs().max() / H.abs().max())
    H = (H + H.T) / 2
    seconds_h = time.time() - t0
    logger.info("Hessian done in %.0fs (rank of ∂u/∂θ per position: %d-%d of %d)", seconds_h, min(ranks),
                max(ranks), vp.wv.shape[0] * vp.head_dim)

    # checks against the whole peft model in float64: loss, gradient, one Hessian-vector product (double backward)
    model.double()
    params = [vp.A, vp.B]
    for p in params:
        p.requires_grad_(True)
    batch = collate(train_ex, pad)
    loss_full = per_example_loss(forward_logits(model, batch), batch["labels"]).mean()
    grads = torch.autograd.grad(loss_full, params, create_graph=True)
    g_full = torch.cat([g.reshape(-1) for g in grads])
    eig, vecs = torch.linalg.eigh(H)
    probes = {"random": torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
              "top_eigvec": vecs[:, -1], "median_eigvec": vecs[:, P // 2],
              "smallest_abs_eigvec": vecs[:, int(eig.abs().argmin())]}
    hvp = {}
    for name, v in probes.items():  # ‖Hv − H_ref v‖: relative, and against the damping λ (1e-3 x mean eig.)
        hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g_full @ v, params, retain_graph=True)])
        err = float((H @ v - hv).norm())
        hvp[name] = {"rel_error": err / float(hv.norm()), "error_over_lambda": err / (1e-3 * float(eig.mean())),
                     "ggn_rel_error": float((G @ v - hv).norm() / hv.norm())}
    v, hv = probes["random"], None
    g_full = g_full.detach()
    for p in params:
        p.requires_grad_(False)
    g_mean = g_train.mean(0)
    checks = {
        "logits_rel_error": max(err_train, err_query),
        "loss_vs_model": abs(float(loss_full.detach()) - float(loss_train.mean())),
        "rows0_loss_vs_explicit": float((rows0["train_loss"].double() - loss_train).abs().max()),
        "grad_rel_error": float((g_full - g_mean).norm() / g_full.norm()),
        "hvp_vs_float64_model": hvp,
        "hessian_asymmetry_before_symmetrising": asym_total,
        "residual_block_asymmetry": asym,
        "jacobian_rank": [min(ranks), max(ranks)],
        "jacobian_written_out_vs_autodiff": jac_err,
        "mean_gradient_norm_over_mean_example_gradient_norm": float(g_mean.norm() / g_train.norm(dim=1).mean()),
    }
    logger.info("checks: %s", json.dumps(checks))
    tensors = {"H": H, "GGN": (G + G.T) / 2, "H_hidden": R_res, "H_bilinear": H_bil, "g_train": g_train,
               "g_query": g_query, "loss_train": loss_train, "loss_query": loss_query, "theta0": theta0.double(),
               **{f"rows0_{k}": v for k, v in rows0.items()}}
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "brute.safetensors"))
    (out / "brute.json").write_text(json.dumps({
        "P": P, "N": N, "n_query": len(query_ex), "lora_rank": vp.rank, "scale": vp.scale,
        "response_positions": len(pos), "hessian_seconds": round(seconds_h, 1),
        "seconds": round(time.time() - t_start, 1), "checks": checks,
        "param_order": "lora_A [r, D] then lora_B [G*hd, r], row-major"}, indent=1))
    return out


# ---------------------------------------------------------------------- the methods


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """`NAME:key=value,key=value` (`--daunce-variant`) -> (NAME, ["key=value", ...]), checked by parse_overrides."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name or name in VARIANTS or "/" in name:
        raise SystemExit(f"--daunce-variant {spec!r}: expected NAME:key=value,... with a new NAME "
                         f"(not {sorted(VARIANTS)})")
    pairs = [p.strip() for p in rest.split(",") if p.strip()]
    parse_overrides(pairs)  # a malformed pair stops here
    return name, pairs


def daunce(name: str, k: int, target: Path, paths: dict[str, Path], work: Path, extra: list[str],
           variant: list[str] | None = None) -> Path:
    """WORK/daunce-NAME with K perturbations (resumable: a larger K later computes only the missing ones).

    `variant`: an extra `adapter=continue` run (`--daunce-variant NAME:...`), those overrides after `extra`."""
    from llm_attr.methods.daunce import Daunce, DaunceConfig

    out = work / f"daunce-{name}"
    wall = out / "wall.json"
    if wall.exists() and json.loads(wall.read_text()).get("perturbations", 0) >= k:
        return out
    cfg = load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml",
                      parse_overrides([*VARIANTS["continue" if variant is not None else name],
                                       f"perturbations={k}", *extra, *(variant or [])]))
    t0 = time.time()
    Daunce(cfg).run(str(target), paths["train"], paths["query"], out, score=False)
    wall.write_text(json.dumps({"seconds": round(time.time() - t0, 1), "perturbations": k}))
    return out


def gradients(target: Path, paths: dict[str, Path], work: Path) -> dict[str, np.ndarray]:
    """Exact LoRA gradients (projection_rank 0) with K-FAC statistics, scored by every gradient method."""
    from llm_attr.errors import LlmAttrError
    from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig
    from llm_attr.methods.gradient_store import score_run

    out = work / "gradients"
    wall = out / "wall.json"
    if not wall.exists():
        t0 = time.time()
        GradientAttribution(GradientConfig(method="if-ekfac", projection_rank=0, max_length=128)).run(
            str(target), paths["train"], paths["query"], out)
        wall.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    scores = {}
    for method in GRADIENT_SCORINGS:
        try:
            score_run(out, method=method)
        except LlmAttrError as e:
            logger.info("%s: not scored (%s)", method, e)
            continue
        scores[method] = load_scores(out)[0].astype(np.float64)
    return scores


# ---------------------------------------------------------------------- analysis


def shards(run: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """`{key: [K, n]}` of the run's rows in perturbation order, and each shard's meta."""
    from llm_attr.methods.daunce_store import shard_name
    from llm_attr.store import Store

    store = Store.open(run, "daunce")
    done = set(store.complete_shards())
    names = [shard_name(k) for k in range(store.manifest["perturbations"]) if shard_name(k) in done]
    data = [store.read_shard(n) for n in names]
    keys = [f"{side}_{s}" for side in ("train", "query") for s in ("loss", "margin")] + ["subset", "xi"]
    rows = {key: np.stack([d[key].numpy() for d in data]) for key in keys if key in data[0]}
    return rows, [(store.shard_info(n) or {}).get("meta", {}) for n in names]


def adapter_vector(folder: Path):
    """θ (A then B, the recipe's order) of a saved peft adapter folder."""
    import torch
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    a = [v for k, v in t.items() if "lora_A" in k]
    b = [v for k, v in t.items() if "lora_B" in k]
    if len(a) != 1 or len(b) != 1:
        raise SystemExit(f"{folder}: expected one LoRA module, found {sorted(t)}")
    return torch.cat([a[0].reshape(-1), b[0].reshape(-1)]).double()


def rowwise(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean over query rows of (Spearman, Pearson) between `a [Q, N]` and `b [Q, N]`."""
    from scipy.stats import pearsonr, spearmanr

    sp = [spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)]
    pe = [pearsonr(x, y)[0] for x, y in zip(a, b, strict=True)]
    return float(np.nanmean(sp)), float(np.nanmean(pe))


def influence(C: np.ndarray, gq: np.ndarray, gt: np.ndarray, damping: float) -> np.ndarray:
    return gq @ np.linalg.solve(C + damping * np.eye(C.shape[0]), gt.T)


def analyse(work: Path, grad_scores: dict[str, np.ndarray], runs: dict[str, Path], curvature: str,
            rel_damping: float, seed: int, continued: tuple[str, ...] = ("continue",)) -> dict:
    import torch
    from safetensors.torch import load_file

    from llm_attr.methods.daunce import perturbation_plan
    from llm_attr.methods.daunce_store import adapter_dir
    from llm_attr.scoring import covariance_scores

    b = {k: v.numpy() for k, v in load_file(str(work / "brute" / "brute.safetensors")).items()}
    info = json.loads((work / "brute" / "brute.json").read_text())
    H, GGN, gt, gq = b["H"], b["GGN"], b["g_train"], b["g_query"]
    P, N = H.shape[0], gt.shape[0]
    eig = np.linalg.eigvalsh(H)
    eig_g = np.linalg.eigvalsh(GGN)
    lam = rel_damping * float(eig.mean())
    lam_g = rel_damping * float(eig_g.mean())
    vals, vecs = np.linalg.eigh(H)
    absH = (vecs * np.abs(vals)) @ vecs.T
    brute = {"hessian": influence(H, gq, gt, lam), "abs": influence(absH, gq, gt, lam),
             "ggn": influence(GGN, gq, gt, lam_g)}
    if curvature == "auto":  # H itself unless H + λI is indefinite
        curvature = "hessian" if eig.min() + lam > 0 else "abs"
    truth = brute[curvature]
    spectrum = {"P": P, "N": N, "lambda": lam, "lambda_ggn": lam_g, "relative_damping": rel_damping,
                "eig_min": float(eig.min()), "eig_max": float(eig.max()), "eig_mean": float(eig.mean()),
                "n_negative": int((eig < 0).sum()), "n_below_minus_lambda": int((eig < -lam).sum()),
                "negative_mass": float(-eig[eig < 0].sum() / np.abs(eig).sum()),
                "ggn_eig_min": float(eig_g.min()), "ggn_eig_max": float(eig_g.max()),
                "eig_quantiles": [float(q) for q in np.quantile(eig, [0, 0.01, 0.1, 0.5, 0.9, 0.99, 1])],
                "effective_rank_ggn": float(eig_g.clip(min=0).sum() ** 2 / (eig_g.clip(min=0) ** 2).sum()),
                "curvature_used": curvature}
    variants = {f"{a}_vs_{c}": rowwise(brute[a], brute[c])[0] for a in CURVATURES for c in CURVATURES if a < c}
    C = {"hessian": H, "abs": absH, "ggn": GGN}[curvature]
    damped = {f: influence(C, gq, gt, f * rel_damping * eig.mean()) for f in (10, 100)}  # larger λ
    for f in (10, 100, 1000):  # damping sensitivity of the chosen brute force
        variants[f"damping_x{f}"] = rowwise(truth, influence(C, gq, gt, f * rel_damping * eig.mean()))[0]
    results = {"model": None, "brute": info, "spectrum": spectrum, "brute_variants_spearman": variants,
               "methods": [], "daunce": {}}

    def add(method: str, scores: np.ndarray, **extra) -> dict:
        sp, pe = rowwise(scores, truth)
        sp_g, _ = rowwise(scores, brute["ggn"])
        row = {"method": method, "spearman": sp, "pearson": pe, "spearman_vs_ggn": sp_g,
               **{f"spearman_damping_x{f}": rowwise(scores, v)[0] for f, v in damped.items()}, **extra}
        results["methods"].append(row)
        return row

    add("grad-dot (exact g, this recipe)", gq @ gt.T)
    for m, s in grad_scores.items():
        add(m, s)
    F_ = gt.T @ gt / N
    Hd = {"hessian": H, "abs": absH, "ggn": GGN}[curvature] + lam * np.eye(P)
    hinv_g = np.linalg.solve(Hd, gt.T)
    add("kernel g_q^T H^-1 F H^-1 g_j (converged perturbations)", gq @ np.linalg.solve(Hd, F_ @ hinv_g))

    for name, run in runs.items():
        rows, meta = shards(run)
        K = rows["train_loss"].shape[0]
        steps = sorted({int(m.get("steps", -1)) for m in meta})
        per_k = float(np.mean([m.get("seconds", 0.0) for m in meta]))
        d = {"K": K, "steps_per_perturbation": steps, "seconds_per_perturbation": round(per_k, 2)}
        for signal in ("loss", "margin"):
            for measure in ("cov", "corr"):
                for k in [k for k in KS if k <= K]:
                    q = torch.from_numpy(rows[f"query_{signal}"][:k])
                    t = torch.from_numpy(rows[f"train_{signal}"][:k])
                    s = np.asarray(covariance_scores(q, t, measure=measure), dtype=np.float64)
                    h = k // 2
                    halves = [np.asarray(covariance_scores(q[sl], t[sl], measure=measure), dtype=np.float64)
                              for sl in (slice(0, h), slice(h, 2 * h))]
                    r_half = rowwise(*halves)[0]
                    rel = 2 * r_half / (1 + r_half) if r_half > -1 else float("nan")  # Spearman-Brown, K
                    row = add(f"daunce-{name} {signal}/{measure}", s, K=k, split_half=r_half, reliability=rel,
                              seconds=round(per_k * k, 1))
                    row["noise_free_estimate"] = (row["spearman"] / np.sqrt(rel)) if rel > 0 else float("nan")
        d["train_loss_ratio"] = train_loss_ratio(rows, b)
        if name in continued:
            d.update(decompose(run, rows, b, K, steps, perturbation_plan, adapter_dir, covariance_scores, add,
                               Hd=Hd, label="" if name == "continue" else f", {name}"))
        results["daunce"][name] = d
    return results


def train_loss_ratio(rows: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    """How far the perturbations moved the training loss: mean train loss under θ_k over that under θ₀."""
    r = rows["train_loss"].mean(1) / b["rows0_train_loss"].mean()
    return {"mean": float(r.mean()), "min": float(r.min()), "max": float(r.max())}


def decompose(run, rows, b, K, steps, perturbation_plan, adapter_dir, covariance_scores, add, Hd=None,
              label: str = "") -> dict:
    """Daunce (adapter=continue)'s error into sampling noise, non-linearity and the bias of its Σ.

    `Hd`: the damped curvature of the brute force; with it, each kept adapter's θ_k − θ₀ against the minimiser
    step δ*_k = −Hd⁻¹ ∇(perturbed objective at θ₀) (cosine, norm ratio, and the kernel of the δ*'s covariance)."""
    import torch
    from scipy.stats import pearsonr

    conf = json.loads((run / "manifest.json").read_text())["config"]
    gt, gq, theta0 = b["g_train"], b["g_query"], b["theta0"]
    N = gt.shape[0]
    ks = [k for k in range(K) if (adapter_dir(run, k) / "adapter_model.safetensors").is_file()]
    out: dict = {"adapters": len(ks)}
    if not ks:
        return out
    delta = np.stack([(adapter_vector(adapter_dir(run, k)).numpy() - theta0) for k in ks])  # [Ka, P]
    lr = float(conf.get("learning_rate", 1e-3))
    out["displacement"] = {"mean_abs": float(np.abs(delta).mean()), "share_at_lr": float(
        (np.abs(np.abs(delta) - lr) < 0.01 * lr).mean()), "learning_rate": lr,
        "norm_over_theta0_norm": float(np.linalg.norm(delta, axis=1).mean() / np.linalg.norm(theta0))}
    # (ii) non-linearity: the stored change of each loss against its first-order prediction g_jᵀ Δ_k
    lin, lin_q = [], []
    for i, k in enumerate(ks[:8]):
        lin.append(pearsonr(rows["train_loss"][k] - b["rows0_train_loss"], gt @ delta[i])[0])
        lin_q.append(pearsonr(rows["query_loss"][k] - b["rows0_query_loss"], gq @ delta[i])[0])
    actual = np.concatenate([(rows["train_loss"][ks] - b["rows0_train_loss"]).ravel(),
                             (rows["query_loss"][ks] - b["rows0_query_loss"]).ravel()])
    pred = np.concatenate([(delta @ gt.T).ravel(), (delta @ gq.T).ravel()])
    out["linearisation"] = {"pearson_first8_train": float(np.mean(lin)), "pearson_first8_query": float(np.mean(lin_q)),
                            "r2_pooled_all_k": float(1 - ((actual - pred) ** 2).sum() / ((actual - actual.mean()) ** 2).sum()),
                            "pearson_pooled_all_k": float(pearsonr(actual, pred)[0])}
    # the kernel of the perturbations' own covariance: what loss/cov would be if the losses were linear in θ
    kernels = {}
    for k in [k for k in KS if k <= len(ks)]:
        d = delta[:k] - delta[:k].mean(0)
        sig = d.T @ d / (k - 1)
        kern = gq @ sig @ gt.T
        daunce_cov = np.asarray(covariance_scores(torch.from_numpy(rows["query_loss"][ks[:k]]),
                                                  torch.from_numpy(rows["train_loss"][ks[:k]]), measure="cov"),
                                dtype=np.float64)
        row = add(f"kernel g_q^T Σ̂_K g_j (kept adapters{label})", kern, K=k)
        row["spearman_vs_daunce_loss_cov"] = rowwise(kern, daunce_cov)[0]
        kernels[k] = row
    # (iii) the K → ∞ limit of Σ when a perturbation is one Adam step: Δ_k = −lr·sign(∇ objective at θ₀)
    gamma, rho, ratio = float(conf.get("gamma", 1.0)), float(conf.get("rho", 1.0)), float(conf.get("subsample_ratio"))
    pseed = int(conf.get("seed", 0))

    def first_step(k: int) -> np.ndarray:
        plan = perturbation_plan(pseed, k, N, ratio)
        w = 1.0 + rho * (2.0 * plan.xi.double().numpy() - 1.0)
        sub = plan.subset.numpy()
        u = ((gamma - w[sub])[:, None] * gt[sub]).mean(0)
        return -lr * np.sign(u)

    def objective_gradient(k: int) -> np.ndarray:  # ∇ of γ·(ℓ_i − ℓ_i(θ₀)) − w_i⟨f − f₀, ∂ℓ_i/∂f⟩ at θ₀, mean on D_k
        plan = perturbation_plan(pseed, k, N, ratio)
        w = 1.0 + rho * (2.0 * plan.xi.double().numpy() - 1.0)
        sub = plan.subset.numpy()
        return ((gamma - w[sub])[:, None] * gt[sub]).mean(0)

    if Hd is not None:
        star = -np.linalg.solve(Hd, np.stack([objective_gradient(k) for k in ks]).T).T  # [Ka, P]

        def cos(a, c):
            return float(np.dot(a, c) / np.linalg.norm(a) / np.linalg.norm(c))

        cosines = [cos(a, c) for a, c in zip(star, delta, strict=True)]
        out["minimiser_step"] = {
            "cosine_mean": float(np.mean(cosines)), "cosine_min": float(np.min(cosines)),
            "cosine_max": float(np.max(cosines)),
            "norm_ratio_mean": float(np.mean(np.linalg.norm(delta, axis=1) / np.linalg.norm(star, axis=1))),
            "cosine_of_centred": float(np.mean([cos(a, c) for a, c in zip(star - star.mean(0), delta - delta.mean(0),
                                                                            strict=True)])),
            "cosine_to_one_step_sign": float(np.mean([cos(-np.sign(objective_gradient(k)), c)
                                                      for k, c in zip(ks, delta, strict=True)]))}
        for k in [k for k in KS if k <= len(ks)]:
            d = star[:k] - star[:k].mean(0)
            add(f"kernel g_q^T Σ(δ*)_K g_j (minimiser steps of these draws{label})", gq @ (d.T @ d) @ gt.T / (k - 1),
                K=k)

    pred_delta = np.stack([first_step(k) for k in ks])
    out["one_step_sign_model"] = {"agreement_with_kept_adapters": float((np.sign(pred_delta) == np.sign(delta)).mean()),
                                  "cosine": float(np.mean([np.dot(a, c) / np.linalg.norm(a) / np.linalg.norm(c)
                                                           for a, c in zip(pred_delta, delta, strict=True)]))}
    if steps == [1] and out["one_step_sign_model"]["agreement_with_kept_adapters"] > 0.99:
        mc = np.stack([first_step(k) for k in range(20000)])
        mc -= mc.mean(0)
        sig_inf = mc.T @ mc / (len(mc) - 1)
        row = add("kernel g_q^T Σ_∞ g_j (one-step limit, 20000 draws)", gq @ sig_inf @ gt.T, K=20000)
        out["sigma_inf_vs_daunce"] = {}
        for k in [k for k in KS if k <= K]:
            s = np.asarray(covariance_scores(torch.from_numpy(rows["query_loss"][:k]),
                                             torch.from_numpy(rows["train_loss"][:k]), measure="cov"), dtype=np.float64)
            out["sigma_inf_vs_daunce"][k] = rowwise(s, gq @ sig_inf @ gt.T)[0]
        out["sigma_inf_vs_brute"] = row["spearman"]
    return out


def table(results: dict) -> str:
    lines = ["| method | K | Spearman vs brute | Pearson vs brute | Spearman vs brute 10λ | Spearman vs brute 100λ "
             "| Spearman vs GGN brute | split-half (K/2 vs K/2) | reliability at K | Spearman / √rel "
             "| vs Daunce loss/cov |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "" if x is None else f"{x:+.3f}" if isinstance(x, float) and np.isfinite(x) else str(x)

    for r in results["methods"]:
        lines.append(f"| {r['method']} | {r.get('K', '')} | {f(r['spearman'])} | {f(r['pearson'])} | "
                     f"{f(r['spearman_damping_x10'])} | {f(r['spearman_damping_x100'])} | {f(r['spearman_vs_ggn'])} | {f(r.get('split_half'))} | {f(r.get('reliability'))} | "
                     f"{f(r.get('noise_free_estimate'))} | {f(r.get('spearman_vs_daunce_loss_cov'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-query", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=256, help="Daunce adapter=continue perturbations")
    ap.add_argument("--k-new", type=int, default=256, help="Daunce adapter=new (default config) perturbations; 0: skip")
    ap.add_argument("--curvature", choices=("auto", *CURVATURES), default="auto",
                    help="brute force with H, |H| (eigenvalues' absolute values) or the Gauss-Newton matrix; auto: "
                         "H unless H + λI is indefinite, then |H|")
    ap.add_argument("--damping", type=float, default=1e-3, help="λ = this x the mean eigenvalue")
    ap.add_argument("--chunk", type=int, default=16, help="response positions per Jacobian batch")
    ap.add_argument("--target-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--daunce-set", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides for every Daunce run")
    ap.add_argument("--daunce-variant", action="append", default=[], metavar="NAME:KEY=VALUE,KEY=VALUE",
                    help="an extra Daunce run (adapter=continue, keep_adapters=true, these overrides) into "
                         "WORK/daunce-NAME, scored like the continue run (repeatable)")
    ap.add_argument("--k-variant", type=int, default=32, help="perturbations of each --daunce-variant")
    ap.add_argument("--stop-after", choices=("data", "target", "brute", "gradients", "daunce"))
    ap.add_argument("--json", type=Path, help="write the figures here (default WORK/results.json)")
    args = ap.parse_args()
    extra_runs = [parse_variant(v) for v in args.daunce_variant]
    setup_logging(logging.INFO)
    import torch

    torch.set_num_threads(1)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = build_data(work, args.n_train, args.n_query, args.seed)
    if args.stop_after == "data":
        return
    target = build_target(args.model, work, paths["train"], TARGET, args.target_set)
    if args.stop_after == "target":
        return
    brute_force(target, paths, work, args.chunk)
    if args.stop_after == "brute":
        return
    grad_scores = gradients(target, paths, work)
    if args.stop_after == "gradients":
        return
    runs = {"continue": daunce("continue", args.k, target, paths, work, args.daunce_set)}
    if args.k_new:
        runs["new"] = daunce("new", args.k_new, target, paths, work, args.daunce_set)
    for name, pairs in extra_runs:
        runs[name] = daunce(name, args.k_variant, target, paths, work, args.daunce_set, variant=pairs)
    if args.stop_after == "daunce":
        return
    results = analyse(work, grad_scores, runs, args.curvature, args.damping, args.seed,
                      continued=("continue", *(name for name, _ in extra_runs)))
    results["model"] = args.model
    results["target_seconds"] = json.loads((work / "target_wall.json").read_text())["seconds"]
    results["target"] = json.loads((target / "manifest.json").read_text())
    results["walls"] = {name: json.loads((run / "wall.json").read_text()) for name, run in runs.items()}
    results["walls"]["gradients"] = json.loads((work / "gradients" / "wall.json").read_text())
    out = args.json or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps({"spectrum": results["spectrum"], "checks": results["brute"]["checks"],
                      "brute_variants_spearman": results["brute_variants_spearman"],
                      "daunce": results["daunce"]}, indent=1, default=float))
    print(table(results))


if __name__ == "__main__":
    main()
