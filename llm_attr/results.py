"""`AttributionResult`: what `Daunce(...).run(...)` and `GradientAttribution(...).run(...)` return, a scored run directory
as an object: `.scores`, `.ids`, `.topk(query_id, k)`, `.path`.

It is also a path (`os.PathLike`, `result / "topk.md"`, `str(result)`), so code that used the directory the methods
returned before keeps working.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .errors import RunDirError


class AttributionResult(os.PathLike):
    """A scored run directory: `scores.safetensors` (`scores` float32 `[n_query, n_train]`) and `ids.json`.

    scores: `[n_query, n_train]` float32 tensor, memory-mapped from the file (`scores_array`: the numpy memmap).
    ids: `{"query": [...], "train": [...]}`, the rows and columns. topk(query_id, k): the k highest-scoring training
    examples of a query as `[(train_id, score), ...]`. A positive score means the training example helps the query.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"AttributionResult({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (AttributionResult, str, os.PathLike)):
            return self.path == Path(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.path)

    def _file(self, name: str) -> Path:
        f = self.path / name
        if not f.is_file():
            raise RunDirError(f"{f}: not there (the run was not scored: score it with `llm-attr score {self.path}`)")
        return f

    @cached_property
    def ids(self) -> dict[str, list[str]]:
        return json.loads(self._file("ids.json").read_text())

    @property
    def query_ids(self) -> list[str]:
        return self.ids["query"]

    @property
    def train_ids(self) -> list[str]:
        return self.ids["train"]

    @cached_property
    def scores_array(self) -> np.ndarray:
        """`[n_query, n_train]` float32, a read-only memory map of the safetensors file (nothing is read ahead)."""
        f = self._file("scores.safetensors")
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        meta = header["scores"]
        if meta["dtype"] != "F32":
            raise RunDirError(f"{f}: scores are {meta['dtype']}, expected F32")
        start, _ = meta["data_offsets"]
        return np.memmap(f, dtype=np.float32, mode="r", offset=8 + header_len + start, shape=tuple(meta["shape"]))

    @property
    def scores(self) -> torch.Tensor:
        """`[n_query, n_train]` float32, sharing memory with the memory-mapped file (read-only: copy to modify)."""
        import warnings

        with warnings.catch_warnings():  # torch warns that the memmap is read-only; it is, on purpose
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.scores_array)

    def topk(self, query_id: str, k: int = 10) -> list[tuple[str, float]]:
        """The `k` training examples with the highest scores for `query_id`: `[(train_id, score), ...]`."""
        try:
            row = self.query_ids.index(str(query_id))
        except ValueError:
            raise KeyError(f"{self.path}: no query with id {query_id!r}") from None
        values = np.asarray(self.scores_array[row], dtype=np.float64)
        order = np.argsort(-values, kind="stable")[:k]
        return [(self.train_ids[j], float(values[j])) for j in order]


def result_of(out: str | os.PathLike) -> AttributionResult:
    """The result object of a run directory (what the methods' `run` returns)."""
    return AttributionResult(out)
