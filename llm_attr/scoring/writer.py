"""One writer for the files of a scoring: scores, ids, the top-k table, the training texts it quotes.

Every scoring of a run keeps its own files under `RUN/scorings/<tag>/` (the tag names what was scored: measure,
signal and K for Daunce, the method and damping for gradients), so rescoring loses nothing. The latest scoring is
also published under the documented names `RUN/scores.safetensors`, `RUN/ids.json`, `RUN/topk.md` and
`RUN/scores.json` (hard links where the file system allows, else copies), which is what evaluation reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_json, atomic_write_text
from ..store import run_input
from .kernels import ScoreFile, topk_rows

__all__ = ["SCORINGS_DIR", "format_topk", "publish", "record_text", "scores_line", "scoring_dir", "shorten",
           "train_texts", "write_ids", "write_scoring", "write_self_influence", "write_topk_table"]

logger = logging.getLogger(__name__)

def shorten(text: str, width: int = 80) -> str:
    """One line of at most `width` characters (whitespace collapsed, '…' when cut)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def record_text(record) -> str:
    """`prompt → response` of a record (`Record` or dict), for tables."""
    if isinstance(record, dict):
        from ..data.records import record_from_dict

        record = record_from_dict(record, "record")
    return f"{record.prompt_text()} → {record.response_text()}"


def write_ids(path: str | Path, query_ids: Sequence[str], train_ids: Sequence[str]) -> None:
    """`ids.json`: `{"query": [...], "train": [...]}`, the row and column order of the scores."""
    atomic_write_json(path, {"query": list(query_ids), "train": list(train_ids)})


def write_topk_table(
    path: str | Path,
    query_ids: Sequence[str],
    train_ids: Sequence[str],
    values: np.ndarray,
    indices: np.ndarray,
    train_text: Callable[[int], str] | None = None,
    title: str = "",
    queries: Sequence[str] | None = None,
) -> Path:
    """Markdown table: query id, rank, train id, score, the training text shortened (one row per hit);
    `queries`: lines shown above it (each query's response with its measured span in bold)."""
    lines = [f"# {title}" if title else "# Top training examples per query", ""]
    if queries:
        lines += ["Queries, the measured span of each response in **bold**:", ""]
        lines += [f"- {q}" for q in queries] + [""]
    lines += ["| query | rank | train id | score | training text |", "|---|---:|---|---:|---|"]
    for qi, qid in enumerate(query_ids):
        for rank, (v, j) in enumerate(zip(values[qi], indices[qi], strict=True), start=1):
            text = shorten(train_text(int(j))) if train_text else ""
            text = text.replace("|", "\\|")
            lines.append(f"| {qid} | {rank} | {train_ids[j]} | {v:.4g} | {text} |")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def format_topk(query_ids: Sequence[str], train_ids: Sequence[str], values: np.ndarray, indices: np.ndarray,
                train_text: Callable[[int], str] | None = None, max_queries: int = 3, width: int = 60) -> str:
    """A plain-text top-k table for the terminal (the first `max_queries` queries)."""
    rows = [f"{'query':<14} {'rank':>4}  {'train id':<14} {'score':>10}  training text"]
    for qi, qid in enumerate(list(query_ids)[:max_queries]):
        for rank, (v, j) in enumerate(zip(values[qi], indices[qi], strict=True), start=1):
            text = shorten(train_text(int(j)), width) if train_text else ""
            rows.append(f"{qid:<14} {rank:>4}  {train_ids[j]:<14} {v:>10.4g}  {text}")
    if len(query_ids) > max_queries:
        rows.append(f"... ({len(query_ids) - max_queries} more queries in the top-k table)")
    return "\n".join(rows)


SCORINGS_DIR = "scorings"
#: The files of one scoring, kept under `scorings/<tag>/` and published at the top of the run.
SCORING_FILES = ("scores.safetensors", "topk.md", "scores.json")


def scoring_dir(run: str | Path, tag: str) -> Path:
    return Path(run) / SCORINGS_DIR / tag


def train_texts(run: str | Path, indices: set[int]) -> dict[int, str]:
    """Shortened `prompt → response` of the training records at `indices`, read line by line from the run's copy
    of its training records (empty when it has none)."""
    out: dict[int, str] = {}
    path = run_input(run, "train")
    if path is None:
        return out
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in indices and line.strip():
                out[i] = record_text(json.loads(line))
    return out


def scores_line(out: str | Path) -> str:
    """The line the CLI prints after a scoring: where its scores and top-k table are."""
    return f"scores: {Path(out) / 'scores.safetensors'}   top-k table: {Path(out) / 'topk.md'}"


def publish(src: Path, dst: Path) -> None:
    """Make `dst` show the file `src` (a hard link, or a copy), replacing `dst` atomically."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.publish.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_scoring(out: str | Path, *, tag: str, query_ids: Sequence[str], train_ids: Sequence[str],
                  fill: Callable[[np.ndarray], None], texts_from: str | Path, title: str, top_k: int,
                  info: dict[str, Any], metadata: dict[str, Any] | None = None,
                  queries: Sequence[str] | None = None) -> dict[str, Any]:
    """Write one scoring into `out`: `fill(array)` writes the float32 `[Q, N]` scores into a memory-mapped file.

    Files: `scorings/<tag>/{scores.safetensors, topk.md, scores.json}`, published at the top of `out`, and
    `ids.json`. `texts_from`: the run whose training records the top-k table quotes; `queries`: lines above the
    table (the queries with their measured spans marked). Returns `info` with the
    seconds, the files and a plain-text table (`table`).
    """
    out = Path(out)
    folder = scoring_dir(out, tag)
    t0 = time.time()
    sf = ScoreFile(folder / "scores.safetensors", (len(query_ids), len(train_ids)), metadata=metadata)
    try:
        fill(sf.array)
        values, indices = topk_rows(sf.array, top_k)
    except BaseException:
        sf.abort()
        raise
    sf.commit()
    write_ids(out / "ids.json", query_ids, train_ids)
    texts = train_texts(texts_from, set(indices.ravel().tolist()))
    write_topk_table(folder / "topk.md", query_ids, train_ids, values, indices, texts.get, title=title,
                     queries=queries)
    info = {**info, "top_k": top_k, "seconds": round(time.time() - t0, 3), "scoring": tag,
            "files": str(folder)}
    atomic_write_json(folder / "scores.json", info)
    for name in SCORING_FILES:
        publish(folder / name, out / name)
    logger.info("wrote %s [%d x %d] and %s (kept in %s)", out / "scores.safetensors", len(query_ids), len(train_ids),
                out / "topk.md", folder)
    info["table"] = format_topk(query_ids, train_ids, values, indices, texts.get)
    return info


def write_self_influence(run: str | Path, *, tag: str, variance, train_ids: Sequence[str], title: str,
                         top_k: int) -> str:
    """Self-influence `variance [N]` into `scorings/<tag>/self_influence.{safetensors,md}`, published at the top of
    the run; returns a plain-text table of the `top_k` largest."""
    import torch
    from safetensors.torch import save_file

    from ..io import atomic_write

    run = Path(run)
    folder = scoring_dir(run, tag)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "self_influence.safetensors", lambda tmp: save_file({"self_influence": variance}, tmp))
    values, indices = torch.topk(variance, min(top_k, len(train_ids)))
    texts = train_texts(run, set(indices.tolist()))
    lines = [f"# {title}", "", "| rank | train id | variance | training text |", "|---:|---|---:|---|"]
    rows = [f"{'rank':>4}  {'train id':<14} {'variance':>10}  training text"]
    for rank, (v, j) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
        text = texts.get(j, "")
        lines.append(f"| {rank} | {train_ids[j]} | {v:.4g} | {shorten(text).replace('|', chr(92) + '|')} |")
        rows.append(f"{rank:>4}  {train_ids[j]:<14} {v:>10.4g}  {shorten(text, 60)}")
    atomic_write_text(folder / "self_influence.md", "\n".join(lines) + "\n")
    for name in ("self_influence.safetensors", "self_influence.md"):
        publish(folder / name, run / name)
    logger.info("wrote %s and %s (kept in %s)", run / "self_influence.safetensors", run / "self_influence.md",
                folder)
    return "\n".join(rows)
