"""Preconditioners that turn per-example gradients into attribution scores: Grad-Dot, Grad-Cos, damped Fisher, K-FAC
and EK-FAC, plus the TracIn checkpoint sum.

Every score is `apply(g_q) · train_side(g_j)` (`score`). Sign convention of the package: a positive score means the
training example *helps* the query (removing it raises the query's loss). Grad-Dot is +g_qᵀ g_j (a gradient step on
j lowers the query's loss by about lr · g_qᵀ g_j), and influence is +g_qᵀ (F + λI)⁻¹ g_j: the classic influence
function gives the loss change of *up-weighting* j as −g_qᵀ H⁻¹ g_j, so our score is its negative, i.e. the rise of
the query's loss when j is removed (up to the 1/N factor).

Damping: `damping=None` means `relative_damping × mean eigenvalue` (0.1 by default) of F for the Fisher and of each
layer's Kronecker eigenvalues for K-FAC / EK-FAC; a float is an absolute λ.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from .gradients import GradientError, KroneckerFactors, LayerBlock
from .registry import PRECONDITIONERS as REGISTERED

logger = logging.getLogger(__name__)

Gradients = torch.Tensor | Iterable[torch.Tensor]


def _compute_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.promote_types(g.dtype, torch.float32)


def _chunks(gradients: Gradients) -> Iterable[torch.Tensor]:
    """A `[N, d]` tensor or an iterable of `[n, d]` chunks (e.g. store shards) as chunks."""
    return (gradients,) if isinstance(gradients, torch.Tensor) else gradients


def _damping(eigenvalues: torch.Tensor, damping: float | None, relative_damping: float) -> float:
    if damping is not None:
        return float(damping)
    return relative_damping * float(eigenvalues.clamp(min=0).mean())


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes (CUDA: `mem_get_info`; CPU: /proc/meminfo's MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Preconditioner:
    """Identity (Grad-Dot; TracIn per checkpoint). score(q, j) = apply(g_q) · train_side(g_j)."""

    name = "grad-dot"
    needs_fit = False  # identity and cosine: nothing to fit

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """Query side: `[n, d] -> [n, d]`."""
        return g

    def train_side(self, g: torch.Tensor) -> torch.Tensor:
        """Training side: `[n, d] -> [n, d]` (identity except for Grad-Cos)."""
        return g

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None


class Cosine(Preconditioner):
    """Grad-Cos: both sides normalised to unit length (a zero gradient stays zero)."""

    name = "grad-cos"

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        g = g.to(_compute_dtype(g))
        return g / g.norm(dim=-1, keepdim=True).clamp(min=1e-30)

    train_side = apply


class DampedFisher(Preconditioner):
    """(F + λI)⁻¹ with F = (1/N) Σ_j g_j g_jᵀ `[d, d]` over training gradients, by one eigendecomposition.

    Fit with `fit(gradients)` (a `[N, d]` tensor or an iterable of chunks), or `update(chunk)` ... `finalize()`.
    Memory is d² (float32, float64 for float64 gradients): keep d to a few ten thousands.
    """

    name = "if-fisher"
    needs_fit = True

    def __init__(self, damping: float | None = None, relative_damping: float = 0.1) -> None:
        self.damping = damping
        self.relative_damping = relative_damping
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.eigenvalues: torch.Tensor | None = None  # [d]
        self.eigenvectors: torch.Tensor | None = None  # [d, d]
        self.lam: float | None = None

    def update(self, g: torch.Tensor) -> None:
        """Add a chunk of training gradients `[n, d]`."""
        g = g.to(_compute_dtype(g))
        if self._sum is None:
            need = 4 * g.shape[1] ** 2 * g.element_size()  # the sum, a chunk's product, the Fisher, its eigenvectors
            have = _available_bytes(g.device)
            if have is not None and need > have:
                raise GradientError(
                    f"if-fisher: its dense {g.shape[1]} x {g.shape[1]} matrix needs about {need / 2**30:.1f} GiB to "
                    f"fit, {have / 2**30:.1f} GiB are free; use if-kfac / if-ekfac or a smaller projection_rank")
        self._sum = g.T @ g if self._sum is None else self._sum + g.T @ g
        self._count += g.shape[0]

    def finalize(self) -> DampedFisher:
        if self._sum is None or self._count == 0:
            raise GradientError("if-fisher: no training gradients to fit on")
        fisher = self._sum / self._count
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(fisher)
        self.eigenvalues = self.eigenvalues.clamp(min=0)
        self.lam = _damping(self.eigenvalues, self.damping, self.relative_damping)
        self._sum = None
        return self

    def fit(self, gradients: Gradients) -> DampedFisher:
        for chunk in _chunks(gradients):
            self.update(chunk)
        return self.finalize()

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        if self.eigenvectors is None:
            raise GradientError("if-fisher: fit the preconditioner before applying it")
        v = self.eigenvectors.to(g.device, _compute_dtype(g))
        lam = self.eigenvalues.to(g.device, v.dtype)
        return ((g.to(v.dtype) @ v) / (lam + self.lam)) @ v.T

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "eigenvalues": self.eigenvalues,
            "eigenvectors": self.eigenvectors,
            "damping": torch.tensor(self.lam),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.eigenvalues, self.eigenvectors = state["eigenvalues"], state["eigenvectors"]
        self.lam = float(state["damping"])


class KFAC(Preconditioner):
    """Block-diagonal K-FAC: per layer (S ⊗ A + λI)⁻¹ on the row-major vec of G `[out_dim, in_dim]`.

    With A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ: P(G) = Q_S [(Q_Sᵀ G Q_A) / (λ_S λ_Aᵀ + λ)] Q_Aᵀ.
    `blocks` gives the layers' slices of the flat gradient (`GradientExtractor.layer_blocks`).
    """

    name = "if-kfac"
    needs_fit = True

    def __init__(
        self, blocks: Sequence[LayerBlock], damping: float | None = None, relative_damping: float = 0.1
    ):
        self.blocks = list(blocks)
        self.damping = damping
        self.relative_damping = relative_damping
        self.q_a: dict[str, torch.Tensor] = {}  # [in_dim, in_dim]
        self.q_s: dict[str, torch.Tensor] = {}  # [out_dim, out_dim]
        self.eigenvalues: dict[str, torch.Tensor] = {}  # [out_dim, in_dim]
        self.lam: dict[str, float] = {}

    def _fit_bases(self, factors: KroneckerFactors) -> None:
        for b in self.blocks:
            a, s = factors.covariances(b.name)
            if a.shape != (b.in_dim, b.in_dim) or s.shape != (b.out_dim, b.out_dim):
                raise GradientError(
                    f"K-FAC factors of {b.name} do not match its block {b.out_dim}x{b.in_dim}"
                )
            lam_a, self.q_a[b.name] = torch.linalg.eigh(a)
            lam_s, self.q_s[b.name] = torch.linalg.eigh(s)
            self.eigenvalues[b.name] = torch.outer(lam_s.clamp(min=0), lam_a.clamp(min=0))

    def _set_damping(self) -> None:
        for b in self.blocks:
            self.lam[b.name] = _damping(self.eigenvalues[b.name], self.damping, self.relative_damping)

    def fit(self, factors: KroneckerFactors) -> KFAC:
        self._fit_bases(factors)
        self._set_damping()
        return self

    def _rotate(self, g: torch.Tensor, b: LayerBlock, inverse: bool = False) -> torch.Tensor:
        """`[n, out_dim, in_dim]`: Q_Sᵀ G Q_A (or Q_S G Q_Aᵀ when `inverse`)."""
        q_s = self.q_s[b.name].to(g.device, g.dtype)
        q_a = self.q_a[b.name].to(g.device, g.dtype)
        if inverse:
            return q_s @ g @ q_a.T
        return q_s.T @ g @ q_a

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        if not self.eigenvalues:
            raise GradientError(f"{self.name}: fit the preconditioner before applying it")
        g = g.to(_compute_dtype(g))
        out = torch.empty_like(g)
        for b in self.blocks:
            block = g[:, b.start : b.stop].reshape(-1, b.out_dim, b.in_dim)
            eig = self.eigenvalues[b.name].to(g.device, g.dtype)
            rotated = self._rotate(block, b) / (eig + self.lam[b.name])
            out[:, b.start : b.stop] = self._rotate(rotated, b, inverse=True).reshape(g.shape[0], -1)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for b in self.blocks:
            out[f"q_a.{b.name}"] = self.q_a[b.name]
            out[f"q_s.{b.name}"] = self.q_s[b.name]
            out[f"eigenvalues.{b.name}"] = self.eigenvalues[b.name]
            out[f"damping.{b.name}"] = torch.tensor(self.lam[b.name])
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for b in self.blocks:
            self.q_a[b.name] = state[f"q_a.{b.name}"]
            self.q_s[b.name] = state[f"q_s.{b.name}"]
            self.eigenvalues[b.name] = state[f"eigenvalues.{b.name}"]
            self.lam[b.name] = float(state[f"damping.{b.name}"])


class EKFAC(KFAC):
    """K-FAC eigenbases with eigenvalues corrected to the training gradients' second moment in that basis:
    Λ = (1/N) Σ_j (Q_Sᵀ G_j Q_A)² elementwise `[out_dim, in_dim]`; P(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ.
    """

    name = "if-ekfac"

    def fit(self, factors: KroneckerFactors, gradients: Gradients) -> EKFAC:  # type: ignore[override]
        """`gradients`: the training gradients `[N, d]` (or chunks), a second pass after the factors."""
        self._fit_bases(factors)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for chunk in _chunks(gradients):
            chunk = chunk.to(torch.float64)
            for b in self.blocks:
                rotated = self._rotate(chunk[:, b.start : b.stop].reshape(-1, b.out_dim, b.in_dim), b)
                sq = rotated.square().sum(0)
                sums[b.name] = sums[b.name] + sq if b.name in sums else sq
            count += chunk.shape[0]
        if count == 0:
            raise GradientError("if-ekfac: no training gradients to correct the eigenvalues with")
        self.eigenvalues = {name: s.cpu() / count for name, s in sums.items()}
        self._set_damping()
        return self


#: name (`registry.PRECONDITIONERS`, where the CLI takes its choices) -> class
PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    "grad-dot": Preconditioner,
    "grad-cos": Cosine,
    "tracin": Preconditioner,
    "if-fisher": DampedFisher,
    "if-kfac": KFAC,
    "if-ekfac": EKFAC,
}
assert tuple(PRECONDITIONERS) == tuple(REGISTERED), "preconditioners and registry.PRECONDITIONERS disagree"


def build_preconditioner(method: str, blocks: list, damping: float | None,
                         relative_damping: float) -> Preconditioner:
    """An unfitted preconditioner `method` (K-FAC kinds over the layer `blocks`); `needs_fit` says whether it must be fitted."""
    cls = PRECONDITIONERS[method]
    if issubclass(cls, KFAC):
        return cls(blocks, damping, relative_damping)
    if issubclass(cls, DampedFisher):
        return cls(damping, relative_damping)
    return cls()


def score(
    query: torch.Tensor, train: torch.Tensor, preconditioner: Preconditioner | None = None
) -> torch.Tensor:
    """Scores `[n_query, n_train]` float32 from gradients `[n_query, d]` and `[n_train, d]` (in memory)."""
    p = preconditioner or Preconditioner()
    q, t = p.apply(query), p.train_side(train)
    return (q @ t.to(q.dtype).T).float()


def tracin_scores(
    query: Sequence[torch.Tensor], train: Sequence[torch.Tensor], learning_rates: Sequence[float]
) -> torch.Tensor:
    """TracIn: Σ_c lr_c · g_q(θ_c)ᵀ g_j(θ_c) over checkpoints c.

    `query[c]`: `[n_query, d]`, `train[c]`: `[n_train, d]` gradients at checkpoint c (same projection for all c).
    Returns `[n_query, n_train]` float32.
    """
    if not (len(query) == len(train) == len(learning_rates)) or not query:
        raise ValueError(
            "tracin: need one query and one train gradient matrix and one learning rate per checkpoint"
        )
    total = None
    for q, t, lr in zip(query, train, learning_rates, strict=True):
        s = lr * score(q, t)
        total = s if total is None else total + s
    return total
