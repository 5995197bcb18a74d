"""The gradient store: its layout, reading it back in bounded memory, fitting a preconditioner, and scoring.

Shards of a gradient store (`c` the checkpoint, `b` the block):

    projection               p_in.<layer> / p_out.<layer> (none when projection_rank is 0)
    pca-BBBBB                unprojected input / output-gradient statistics of train block b (projection: pca)
    train-cC-BBBBB           gradients [n, d], losses [n], K-FAC statistics (if-kfac / if-ekfac)
    query-cC-BBBBB           gradients [n, d], losses [n]
    preconditioner           the fitted preconditioner; meta: method and damping it was fitted with

Scoring: the query gradients are preconditioned once and the training blocks streamed through
`scoring.score_inner_products` into the scoring's files (`scoring.write_scoring`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from ..data import spans
from ..errors import ConfigError, RunDirError
from ..io import fingerprint, locked
from ..scoring import score_inner_products, scores_line, write_scoring
from ..store import Store, run_input
from .gradients import KroneckerFactors, LayerBlock
from .preconditioners import Preconditioner, build_preconditioner
from .registry import FACTOR_PRECONDITIONERS, PRECONDITIONERS

logger = logging.getLogger(__name__)

METHOD = "gradients"
METHODS: tuple[str, ...] = tuple(PRECONDITIONERS)
FACTOR_METHODS = FACTOR_PRECONDITIONERS
#: Elements of one chunk of training gradients read back for fitting and scoring (32 MiB of float64).
CHUNK_ELEMENTS = 1 << 22
#: Elements of one chunk of training gradients read back for scoring (64 MiB of float32): at d ~ 70k that is 240
#: rows, where the product with the queries runs at the matmul's speed (60 rows ran at half of it).
SCORE_CHUNK_ELEMENTS = 1 << 24
#: d above which the damped Fisher is fitted in float32 rather than float64 (d x d float64 = 512 MiB here).
FISHER_FLOAT64_MAX_DIM = 8192


# ---------------------------------------------------------------------- store layout


def block_ranges(n: int, block_size: int) -> list[tuple[int, int]]:
    """`[(start, stop), ...]` of consecutive blocks of at most `block_size` rows covering `range(n)`."""
    return [(s, min(s + block_size, n)) for s in range(0, n, block_size)]


def gradient_shard(kind: Literal["train", "query"], checkpoint: int, block: int) -> str:
    return f"{kind}-c{checkpoint}-{block:05d}"


def pca_shard(block: int) -> str:
    return f"pca-{block:05d}"


def _read_statistics(store: Store, name: str) -> dict[str, torch.Tensor]:
    """The K-FAC statistics of gradient shard `name` (float64), without reading its gradients."""
    from safetensors import safe_open

    if store.missing([name]):
        raise RunDirError(f"{store.root}: shard {name} is missing or corrupted; re-run `llm-attr gradients`")
    out = {}
    with safe_open(str(store.shard_path(name)), framework="pt") as f:
        for key in f.keys():
            if key not in ("gradients", "losses"):
                value = f.get_tensor(key)
                out[key] = value.double() if value.is_floating_point() else value
    return out


def _has_factors(store: Store, name: str) -> bool:
    """Whether gradient shard `name` holds its block's K-FAC statistics (written by if-kfac / if-ekfac runs)."""
    info = store.shard_info(name)
    return info is not None and "n_tokens" in info["tensors"]


# ---------------------------------------------------------------------- fitting and scoring


def expected_shards(manifest: dict[str, Any]) -> list[str]:
    """Every gradient shard a complete store holds."""
    n_train, n_query = len(manifest["ids"]["train"]), len(manifest["ids"]["query"])
    bs = manifest["block_size"]
    names = []
    for c in range(len(manifest.get("checkpoints") or [None])):
        names += [gradient_shard("train", c, b) for b in range(len(block_ranges(n_train, bs)))]
        names += [gradient_shard("query", c, b) for b in range(len(block_ranges(n_query, bs)))]
    return names


def _layer_blocks(manifest: dict[str, Any]) -> list[LayerBlock]:
    return [LayerBlock(**b) for b in manifest["layers"]]


def _check_complete(store: Store) -> dict[str, Any]:
    manifest = store.manifest
    missing = store.missing(expected_shards(manifest))
    if missing:
        raise RunDirError(f"{store.root}: {len(missing)} gradient blocks are missing ({missing[:3]}...); re-run "
                          "`llm-attr gradients` with the same arguments to compute them")
    return manifest


def train_chunks(store: Store, checkpoint: int = 0, dtype: torch.dtype = torch.float32,
                 max_elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """The stored training gradients at `checkpoint` in row order, as `[n_c, d]` chunks in `dtype` of at most
    `max_elements` elements (at least one row), read lazily from the block shards: memory is bounded for any N, d."""
    manifest = store.manifest
    d = manifest["shapes"]["train_gradients"][1]
    rows = max(1, max_elements // max(d, 1))
    for b, (start, stop) in enumerate(block_ranges(len(manifest["ids"]["train"]), manifest["block_size"])):
        name = gradient_shard("train", checkpoint, b)
        for s in range(0, stop - start, rows):
            yield store.read_slice(name, "gradients", s, min(s + rows, stop - start)).to(dtype)


def query_gradients(store: Store, checkpoint: int = 0) -> torch.Tensor:
    """`[n_query, d]` float32: all stored query gradients at `checkpoint`."""
    manifest = store.manifest
    blocks = block_ranges(len(manifest["ids"]["query"]), manifest["block_size"])
    return torch.cat([store.read_shard(gradient_shard("query", checkpoint, b))["gradients"].float()
                      for b in range(len(blocks))])


def merged_factors(store: Store) -> KroneckerFactors:
    """The K-FAC statistics of all training blocks (checkpoint 0), summed in block order."""
    manifest = store.manifest
    factors = KroneckerFactors()
    for b in range(len(block_ranges(len(manifest["ids"]["train"]), manifest["block_size"]))):
        name = gradient_shard("train", 0, b)
        if not _has_factors(store, name):
            raise RunDirError(f"{store.root}: block {name} holds no K-FAC statistics; re-run `llm-attr gradients` "
                              "with --set method=if-kfac (or if-ekfac) to add them")
        factors.merge(KroneckerFactors.from_state_dict(_read_statistics(store, name)))
    return factors


def _train_digest(store: Store) -> str:
    """Fingerprint of the training gradient shards (checkpoint 0): what a fitted preconditioner depends on."""
    manifest = store.manifest
    n_blocks = len(block_ranges(len(manifest["ids"]["train"]), manifest["block_size"]))
    return fingerprint([store.shard_info(gradient_shard("train", 0, b))["sha256"] for b in range(n_blocks)])


def fit_preconditioner(store: Store, method: str | None = None, damping: float | None = None,
                       relative_damping: float | None = None) -> Preconditioner:
    """The store's preconditioner for `method` (default: the run's), read from the `preconditioner` shard when it was
    fitted with the same method and damping, else fitted on the training gradients and written there."""
    manifest = _check_complete(store)
    cfg = manifest["config"]
    method = method or cfg["method"]
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: expected one of {list(METHODS)}")
    damping = cfg["damping"] if damping is None else damping
    relative_damping = cfg["relative_damping"] if relative_damping is None else relative_damping
    meta = {"method": method, "damping": damping, "relative_damping": relative_damping,
            "train_shards": _train_digest(store)}
    precond = build_preconditioner(method, _layer_blocks(manifest), damping, relative_damping)
    if not precond.needs_fit:
        return precond
    info = store.shard_info("preconditioner")
    if info is not None and info["meta"] == meta and not store.missing(["preconditioner"]):
        precond.load_state_dict(store.read_shard("preconditioner"))
        return precond
    t0 = time.time()
    d = manifest["shapes"]["train_gradients"][1]
    if method == "if-fisher":
        dtype = torch.float64 if d <= FISHER_FLOAT64_MAX_DIM else torch.float32
        precond.fit(train_chunks(store, 0, dtype))
    else:
        factors = merged_factors(store)
        if method == "if-kfac":
            precond.fit(factors)
        else:
            precond.fit(factors, train_chunks(store, 0, torch.float64))
    store.write_shard("preconditioner", precond.state_dict(), meta=meta)
    logger.info("%s: fitted in %.1fs", method, time.time() - t0)
    return precond


def write_scores(out: Path, run: Path, store: Store, method: str, damping: float | None,
                 query: list[torch.Tensor], query_ids: list[str], top_k: int, meta: dict[str, Any],
                 query_span: str | None = None, per_token: bool = False) -> dict[str, Any]:
    """Score query gradients (`query[c]`: `[Q, d]` at checkpoint c) against the store's training gradients into
    `out`: scores.safetensors (float32 `[Q, N]`), ids.json, topk.md, scores.json. Returns figures and a text table.
    `query_span`: the measurement the query gradients are of; `per_token`: one row per query token."""
    manifest = store.manifest
    precond = fit_preconditioner(store, method, damping)
    checkpoints = manifest.get("checkpoints") or [None]
    if method == "tracin" and len(checkpoints) > 1:
        # Σ_c lr_c g_q(c)ᵀ g_j(c): one inner product of the checkpoints' gradients side by side
        lrs = [c["lr"] for c in checkpoints]
        q = torch.cat([lr * g.double() for g, lr in zip(query, lrs, strict=True)], dim=1)
        chunks = (torch.cat(blocks, dim=1)
                  for blocks in zip(*(train_chunks(store, c, max_elements=SCORE_CHUNK_ELEMENTS // len(lrs))
                                      for c in range(len(lrs))), strict=True))
    else:
        lr = checkpoints[0]["lr"] if method == "tracin" and checkpoints[0] is not None else 1.0
        q = lr * precond.apply(query[0].double())
        chunks = (precond.train_side(chunk) for chunk in train_chunks(store, 0, max_elements=SCORE_CHUNK_ELEMENTS))
    train_ids = manifest["ids"]["train"]
    rank = manifest["config"]["projection_rank"]

    def fill(array) -> None:
        score_inner_products(q, chunks, n_train=len(train_ids), out=array)

    tag = (method if damping is None else f"{method}-damping{damping:g}") + spans.span_tag(query_span)
    tag += "-tokens" if per_token else ""
    measured = {} if spans.is_whole(query_span) else {"query_span": query_span}
    measured.update({"per_token": True} if per_token else {})
    title = f"{method} top-{top_k} ({f'projection rank {rank}' if rank else 'exact gradients'}" + (
        f"; query span {query_span!r}" if "query_span" in measured else "") + ("; per token" if per_token else "") + ")"
    return write_scoring(out, tag=tag, query_ids=query_ids, train_ids=train_ids, fill=fill, texts_from=run,
                         title=title, top_k=top_k, metadata={"method": method, "projection_rank": rank, **measured},
                         info={"method": method, "damping": damping, "projection_rank": rank,
                               "dim": manifest["shapes"]["train_gradients"][1], **measured, **meta},
                         queries=None if per_token else spans.marked_queries(run_input(out, "query"), query_span))


@locked("gradient scoring", dir_arg="run")
def score_run(run: str | Path, *, method: str | None = None, damping: float | None = None,
              top_k: int = 10) -> dict[str, Any]:
    """Score a gradient run's queries from its store: RUN/scores.safetensors, ids.json, topk.md, scores.json.

    `method`: another scoring method over the same gradients (grad-dot, grad-cos, if-fisher always; if-kfac and
    if-ekfac when the store holds K-FAC statistics; tracin sums over the store's checkpoints). Returns the figures
    and a text table.
    """
    run = Path(run)
    store = Store.open(run, METHOD)
    manifest = _check_complete(store)
    query = [query_gradients(store, c) for c in range(len(manifest.get("checkpoints") or [None]))]
    return write_scores(run, run, store, method or manifest["config"]["method"], damping, query,
                        manifest["ids"]["query"], top_k, {"run": str(run)},
                        query_span=manifest["config"].get("query_span"))


def score_cli(run: str | Path, *, top_k: int = 10, method: str | None = None, damping: float | None = None,
              query_span: str | None = None, per_token: bool = False) -> dict[str, Any]:
    """`llm-attr score RUN [--method M] [--damping D]` of a gradient store (`score_run`). A gradient store holds
    the query gradients of one measurement: another (`--query-span`, `--per-token`) is refused in one line."""
    own = Store.open(run, METHOD).manifest["config"].get("query_span", spans.RESPONSE)
    if per_token or (query_span is not None and query_span != own):
        raise ConfigError(f"{run}: a gradient store holds its queries' gradients for query_span {own!r} only; "
                          "measure another span or per token with `llm-attr query RUN --query "
                          f"{Path(run) / 'inputs' / 'query.jsonl'} --out NEW --query-span S [--per-token]` "
                          "(it reuses the stored training gradients)")
    return {**score_run(run, method=method, damping=damping, top_k=top_k), "files": scores_line(run)}
