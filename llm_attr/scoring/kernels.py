"""Chunked scoring: covariance/correlation of per-example signals over perturbations, or inner products of gradients.

Train-side data is read in column chunks (a callable `read(start, stop) -> [K, n]`, or an iterator of `[n, d]`
gradient blocks) and the `[n_query, n_train]` float32 scores are written chunk by chunk into a memory-mapped
safetensors file (`ScoreFile`), so 10^6 training examples score in bounded RAM. Convention: a positive score means
the training example helps the query.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..faults import fault_point
from ..io import pid_alive

__all__ = ["BLOCK_ELEMENTS", "QUERY_BLOCK", "SUB_BLOCK_ELEMENTS", "ColumnReader", "Measure", "ScoreFile", "as_tensor",
           "covariance_scores", "load_scores", "prepare_train_signals", "score_inner_products", "self_influence",
           "topk_rows"]

logger = logging.getLogger(__name__)

Measure = Literal["cov", "corr"]
ColumnReader = Callable[[int, int], torch.Tensor]
#: Elements of float64 working memory one scoring block may use (query rows x train columns): 128 MiB.
BLOCK_ELEMENTS = 1 << 24
#: Elements of training signals prepared at once inside a block (256 KiB of float32): the elementwise passes
#: (shift, norms, scaling) then run in cache rather than over the whole block in memory.
SUB_BLOCK_ELEMENTS = 1 << 16
#: Query rows scored per product against prepared train signals (Daunce): each product writes its rows of the
#: scores file directly; the train signals are read once per block.
QUERY_BLOCK = 256


# ---------------------------------------------------------------------- the score matrix on disk


class ScoreFile:
    """A safetensors file with one float32 tensor `[rows, cols]`, filled in place through a numpy memmap.

    Written to a temp file beside `path`; `commit()` flushes it and renames it onto `path` (atomic).
    """

    def __init__(self, path: str | Path, shape: tuple[int, int], name: str = "scores",
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = (int(shape[0]), int(shape[1]))
        nbytes = 4 * self.shape[0] * self.shape[1]
        header: dict = {name: {"dtype": "F32", "shape": list(self.shape), "data_offsets": [0, nbytes]}}
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.tmp"
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            pid = stale.name.split(".")[-2]
            if not (pid.isdigit() and pid_alive(int(pid))):  # left by a killed run
                logger.info("removing %s, the unfinished scores of an interrupted run", stale)
                stale.unlink(missing_ok=True)
        with open(self._tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            f.truncate(8 + len(blob) + nbytes)
        if nbytes:
            self.array: np.ndarray = np.memmap(self._tmp, dtype=np.float32, mode="r+", offset=8 + len(blob),
                                               shape=self.shape)
        else:
            self.array = np.zeros(self.shape, dtype=np.float32)

    def commit(self) -> Path:
        if isinstance(self.array, np.memmap):
            self.array.flush()
            del self.array
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._tmp.unlink(missing_ok=True)


def load_scores(path: str | Path, mmap: bool = True, name: str = "scores") -> np.ndarray:
    """`scores` float32 `[n_query, n_train]` of a scores.safetensors file (memory-mapped by default); `name`: the
    tensor of another `ScoreFile` (e.g. prepared train signals)."""
    path = Path(path)
    if not mmap:
        from safetensors.numpy import load_file

        return load_file(str(path))[name]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    shape = tuple(header[name]["shape"])
    start = 8 + n + header[name]["data_offsets"][0]
    if 0 in shape:
        return np.zeros(shape, dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", offset=start, shape=shape)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor sharing `array`'s memory (a read-only memory map included: never written through)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


# ---------------------------------------------------------------------- covariance over perturbations


def _columns(train: torch.Tensor | ColumnReader, n_train: int | None) -> tuple[ColumnReader, int]:
    """(`read(start, stop) -> [K, stop - start]`, N) of a `[K, N]` tensor or of a reader with its `n_train`."""
    if isinstance(train, torch.Tensor):
        tensor = train
        return (lambda s, e: tensor[:, s:e]), tensor.shape[1]
    if n_train is None:
        raise ValueError("n_train is required with a column reader")
    return train, n_train


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(0, keepdim=True)


def _scale(centred: torch.Tensor, measure: Measure) -> torch.Tensor:
    """Per-column factor turning `centred.T @ other` into cov (1/(K-1)) or, with the other side's, corr."""
    k = centred.shape[0]
    if measure == "cov":
        return torch.full((centred.shape[1],), 1.0 / np.sqrt(k - 1), dtype=torch.float64)
    norm = centred.norm(dim=0)
    return torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))


def covariance_scores(
    query: torch.Tensor,
    train: torch.Tensor | ColumnReader,
    *,
    n_train: int | None = None,
    measure: Measure = "cov",
    chunk_size: int | None = None,
    out: np.ndarray | torch.Tensor | None = None,
    prepared: bool = False,
) -> np.ndarray | torch.Tensor:
    """scores `[Q, N]` float32: covariance over k (centred, /(K-1)) or correlation of query and train signals.

    query: `[K, Q]` signals of the queries under K perturbed models. train: `[K, N]` tensor, or a reader
    `read(start, stop) -> [K, stop - start]` (then `n_train` is required) read in chunks of `chunk_size` columns
    (default: what fits in `BLOCK_ELEMENTS` of float64). A constant column scores 0 under `corr`.
    `out`: an array `[Q, N]` to fill (e.g. `ScoreFile.array`); a new float32 tensor by default.
    `prepared`: `train` is already centred and scaled by `prepare_train_signals` (same `measure`): scoring is then
    float32 matmuls; with `train` a tensor (e.g. `as_tensor` of the memory-mapped prepared file), one per block of
    `QUERY_BLOCK` query rows, written straight into `out`'s rows (no intermediate block, no copy).
    """
    if measure not in ("cov", "corr"):
        raise ValueError(f"measure must be 'cov' or 'corr', got {measure!r}")
    k, n_query = query.shape
    if k < 2:
        raise ValueError(f"covariance over perturbations needs K >= 2 rows, got {k}")
    tensor = train if isinstance(train, torch.Tensor) else None
    if tensor is not None and tensor.shape[0] != k:
        raise ValueError(f"query has K={k} rows but train has {tensor.shape[0]}")
    train, n_train = _columns(train, n_train)
    q = _centred(query)
    qt = (q * _scale(q, measure)).T.contiguous().float()  # [Q, K], centred: Σ_k q_k = 0
    sub_columns = max(1, SUB_BLOCK_ELEMENTS // k)
    chunk = chunk_size or max(1, BLOCK_ELEMENTS // max(n_query, 1))
    if out is None:
        out = torch.empty(n_query, n_train, dtype=torch.float32)
    if prepared and tensor is not None:
        train_f32 = tensor if tensor.dtype == torch.float32 else tensor.float()
        for q0 in range(0, n_query, QUERY_BLOCK):
            q1 = min(q0 + QUERY_BLOCK, n_query)
            rows = out[q0:q1] if isinstance(out, torch.Tensor) else torch.from_numpy(out[q0:q1])
            torch.mm(qt[q0:q1], train_f32, out=rows)
            fault_point("score_chunk")
        return out
    for start in range(0, n_train, chunk):
        stop = min(start + chunk, n_train)
        cols = train(start, stop)
        if cols.shape != (k, stop - start):
            raise ValueError(f"train reader returned {tuple(cols.shape)} for columns {start}:{stop}, expected "
                             f"{(k, stop - start)}")
        if prepared:
            _assign(out, start, stop, qt @ cols.float())
        else:
            for sub in range(start, stop, sub_columns):  # cache-sized pieces: the elementwise passes stay in cache
                end = min(sub + sub_columns, stop)
                _assign(out, sub, end, qt @ _shifted_scaled(cols[:, sub - start : end - start], measure))
        fault_point("score_chunk")
    return out


def prepare_train_signals(train: torch.Tensor | ColumnReader, out: np.ndarray | torch.Tensor, *,
                          measure: Measure, n_train: int | None = None) -> np.ndarray | torch.Tensor:
    """Fill `out [K, N]` float32 with each training column centred over k (in float64) and scaled (corr: to unit
    norm, 0 for a constant column; cov: by 1/sqrt(K-1)). Done once per store, it turns every later scoring pass
    into one matmul (`covariance_scores(..., prepared=True)`); `train` as in `covariance_scores`."""
    train, n_train = _columns(train, n_train)
    k = out.shape[0]
    for start in range(0, n_train, max(1, BLOCK_ELEMENTS // k)):
        stop = min(start + max(1, BLOCK_ELEMENTS // k), n_train)
        c = _centred(train(start, stop))
        _assign(out, start, stop, (c * _scale(c, measure)).float())
    return out


def _shifted_scaled(cols: torch.Tensor, measure: Measure) -> torch.Tensor:
    """`[K, n]` float32 train signals ready for a float32 product with the centred, scaled query side.

    Each column is shifted by its first row rather than centred: the query side sums to 0 over k, so the product
    does not change, and the shifted values are of the size of the variation over k (exact for values within a
    factor 2 of each other), so the float32 product loses nothing to a large mean. The column's centred norm
    (corr) or 1/sqrt(K-1) (cov) is accumulated in float64.
    """
    x = cols.float() - cols[:1].float()  # a new tensor: the caller's columns are never modified
    k = x.shape[0]
    if measure == "cov":
        return x.mul_(1.0 / np.sqrt(k - 1))
    s1 = x.sum(0, dtype=torch.float64)
    ss = torch.linalg.vector_norm(x, dim=0, dtype=torch.float64).square() - s1 * s1 / k
    return x.mul_(torch.where(ss > 0, ss.clamp(min=0).rsqrt(), torch.zeros_like(ss)).float())


def _assign(out: np.ndarray | torch.Tensor, start: int, stop: int, block: torch.Tensor) -> None:
    if isinstance(out, torch.Tensor):
        out[:, start:stop] = block
    else:
        out[:, start:stop] = block.numpy()


def self_influence(train: torch.Tensor | ColumnReader, *, n_train: int | None = None,
                   chunk_size: int = 1 << 20) -> torch.Tensor:
    """`[N]` float32: variance over k (ddof 1) of each training example's signal; `train` as in `covariance_scores`."""
    train, n_train = _columns(train, n_train)
    out = torch.empty(n_train, dtype=torch.float32)
    for start in range(0, n_train, chunk_size):
        stop = min(start + chunk_size, n_train)
        out[start:stop] = train(start, stop).double().var(0, unbiased=True).float()
    return out


# ---------------------------------------------------------------------- inner products (gradient stores)


def score_inner_products(
    query: torch.Tensor,
    train_chunks: Iterable[torch.Tensor],
    *,
    n_train: int,
    normalize: bool = False,
    out: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray | torch.Tensor:
    """scores `[Q, N]` float32: `query [Q, d] @ chunk.T` for consecutive train blocks `[n_c, d]` (rows in order).

    Products in float32 (the stored gradients' precision; norms in float64). With `normalize`, rows are scaled to
    unit norm on both sides (cosine). Each block is used once and dropped,
    so memory is one block plus the output (pass `out=ScoreFile(...).array` to keep that on disk too).
    """
    q = query.double()
    if normalize:
        q = q / q.norm(dim=1, keepdim=True).clamp(min=1e-30)
    q = q.float()  # float32 products, the precision of the stored gradients: 2x the float64 speed on a CPU
    if out is None:
        out = torch.empty(q.shape[0], n_train, dtype=torch.float32)
    start = 0
    for block in train_chunks:
        b = block.float()
        if normalize:
            norm = torch.linalg.vector_norm(b, dim=1, keepdim=True, dtype=torch.float64)
            b = b * (1.0 / norm.clamp(min=1e-30)).float()
        stop = start + b.shape[0]
        if stop > n_train:
            raise ValueError(f"train blocks hold more than n_train={n_train} rows")
        _assign(out, start, stop, q @ b.T)
        fault_point("score_chunk")
        start = stop
    if start != n_train:
        raise ValueError(f"train blocks held {start} rows, expected n_train={n_train}")
    return out


# ---------------------------------------------------------------------- top-k and retrieval metrics


def topk_rows(scores: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) `[Q, k']` of each row's k highest scores (row by row: bounded memory), k' = min(k, N)."""
    n_query, n_train = scores.shape
    k = min(k, n_train)
    values = np.zeros((n_query, k), dtype=np.float32)
    indices = np.zeros((n_query, k), dtype=np.int64)
    for i in range(n_query):
        row = torch.as_tensor(np.asarray(scores[i]))
        v, j = torch.topk(row, k) if k else (row[:0], row[:0].long())
        values[i], indices[i] = v.numpy(), j.numpy()
    return values, indices
