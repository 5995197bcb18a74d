"""Daunce's query measurements from its per-token rows: a span's signal and per-token scores, from any store.

Every perturbation shard holds, beside the per-example rows, each query response token's loss and margin
(`query_token_loss`, `query_token_margin` `[R]`, the queries' tokens one after the other), and the shard
`query-tokens` the characters of the response text each token covers (`chars [R, 2]`) and where each query's
tokens start (`offsets [Q + 1]`). A span's signal under θ_k is then the mean of its tokens' (`data.spans`), the
same value the span's masked loss gives, so one store is rescored with any measurement, without the model.
Per-token scores of query q are the covariance (or correlation) over k of each token's signal with the training
rows: `[R_q, N]`; with `cov`, the mean of a span's per-token scores is the span's score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import spans
from ..data.records import load_records
from ..errors import ConfigError, RunDirError
from ..io import atomic_write_text
from ..scoring import SCORINGS_DIR, ScoreFile, as_tensor, covariance_scores, shorten, train_texts
from ..store import Store, run_input

TOKENS_SHARD = "query-tokens"


def token_tensors(values: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A shard's per-token tensors (`query_token_<signal>` `[R]`) of `evaluate_token_signals`' output."""
    return {f"query_token_{s}": torch.cat(parts) if parts else torch.zeros(0) for s, parts in values.items()}


def write_token_layout(store: Store, chars: Sequence[np.ndarray]) -> None:
    """Write the `query-tokens` shard (the queries' token characters) unless it is there."""
    if store.missing([TOKENS_SHARD]):
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chars])]).astype(np.int64)
        flat = np.concatenate(chars) if chars else np.zeros((0, 2), np.int32)
        store.write_shard(TOKENS_SHARD, {"chars": torch.from_numpy(flat.astype(np.int32)),
                                         "offsets": torch.from_numpy(offsets)})


def token_layout(store: Store) -> tuple[list[np.ndarray], np.ndarray]:
    """(each query's `[R_q, 2]` token characters, offsets `[Q + 1]`); `RunDirError` for a store without them."""
    if store.missing([TOKENS_SHARD]):
        if "blackbox" in store.manifest:
            raise RunDirError(f"{store.root}: this black-box Daunce store holds whole-response rows only (its backend "
                              "gives no per-token log-probabilities, or it was made before they were recorded); "
                              "--query-span and --per-token need a backend with them (local, openai) or white-box "
                              "Daunce")
        raise RunDirError(f"{store.root}: this Daunce store holds no per-token query rows (made before query "
                          "measurements); re-run `llm-attr daunce ... --overwrite` to measure a span or per token")
    shard = store.read_shard(TOKENS_SHARD)
    offsets = shard["offsets"].numpy()
    chars = shard["chars"].numpy()
    return [chars[offsets[q]:offsets[q + 1]] for q in range(len(offsets) - 1)], offsets


def query_records(run: Path) -> list:
    path = run_input(run, "query")
    if path is None:
        raise RunDirError(f"{run}: holds no copy of its queries (inputs/query.jsonl), which a span needs")
    return list(load_records(path))


def _token_rows(store: Store, k_count: int, signal: str) -> torch.Tensor:
    from .daunce_store import shard_name

    return torch.stack([store.read_shard(shard_name(k))[f"query_token_{signal}"] for k in range(k_count)])


def span_rows(run: Path, store: Store, k_count: int, signal: str, spec: str) -> torch.Tensor:
    """`[K, Q]`: each query's mean `signal` over its span's tokens under each θ_k."""
    spans.check_span(spec)
    chars, offsets = token_layout(store)
    masks = spans.span_masks(query_records(run), chars, spec, source=f"{run}/inputs/query.jsonl")
    rows = _token_rows(store, k_count, signal)
    weights = torch.zeros(rows.shape[1], len(masks), dtype=torch.float64)
    for q, mask in enumerate(masks):
        idx = torch.from_numpy(np.flatnonzero(mask) + offsets[q])
        weights[idx, q] = 1.0 / len(idx)
    return (rows.double() @ weights).float()


def _query_index(ids: list[str], query: str | None) -> list[int]:
    if query is None:
        return list(range(len(ids)))
    if query not in ids:
        raise ConfigError(f"--query-id {query!r} is not one of the run's queries ({', '.join(ids[:3])}...)")
    return [ids.index(query)]


def write_token_scores(run: Path, store: Store, prepared: np.ndarray, k_count: int, signal: str, measure: str,
                       tag: str, query: str | None, spec: str | None, top_k: int) -> dict[str, Any]:
    """Per-token scores of the chosen queries (`query`: an id, default all) into `RUN/scorings/<tag>-tokens/`:
    `tokens.safetensors` (`scores [R, N]`, R the chosen queries' response tokens; `offsets [q + 1]`),
    `tokens.md` (each token's top training examples, each top example's most moved tokens) and `tokens.json`."""
    ids = store.manifest["ids"]
    chosen = _query_index(ids["query"], query)
    chars, offsets = token_layout(store)
    records = query_records(run)
    masks = (spans.span_masks(records, chars, spec) if not spans.is_whole(spec)
             else [np.ones(len(c), bool) for c in chars])
    rows = _token_rows(store, k_count, signal)
    cols = torch.cat([torch.arange(int(offsets[q]), int(offsets[q + 1])) for q in chosen])
    folder = run / SCORINGS_DIR / f"{tag}-tokens"
    local = np.concatenate([[0], np.cumsum([int(offsets[q + 1] - offsets[q]) for q in chosen])])
    sf = ScoreFile(folder / "tokens.safetensors", (len(cols), len(ids["train"])),
                   metadata={"measure": measure, "signal": signal, "offsets": json.dumps(local.tolist()),
                             "queries": json.dumps([ids["query"][q] for q in chosen])})
    try:
        covariance_scores(rows[:, cols], as_tensor(prepared), measure=measure, out=sf.array, prepared=True)
        scores = torch.from_numpy(np.array(sf.array))
    except BaseException:
        sf.abort()
        raise
    sf.commit()
    lines, hits = [f"# Daunce per-token scores ({measure} of {signal}, K={k_count})", ""], []
    for i, q in enumerate(chosen):
        text = records[q].response_text()
        block = scores[local[i]:local[i + 1]]  # [R_q, N]
        lines += [f"## {ids['query'][q]}", "", "Span tokens are **bold**.", "",
                  "| token | text | top training examples (score) |", "|---:|---|---|"]
        for t in range(block.shape[0]):
            a, b = chars[q][t]
            piece = text[a:b] if b > a else "(end)"
            piece = piece.replace("|", "\\|").replace("\n", "\\n")
            if masks[q][t]:
                piece = f"**{piece}**"
            top = torch.topk(block[t], min(3, block.shape[1]))
            hits += top.indices.tolist()
            lines.append(f"| {t} | {piece} | " + ", ".join(
                f"{ids['train'][j]} ({v:.3g})" for v, j in zip(top.values.tolist(), top.indices.tolist(),
                                                              strict=True)) + " |")
        mean = block[torch.from_numpy(masks[q])].mean(0)
        lines += ["", "| training example | tokens it moves most (score) |", "|---|---|"]
        for j in torch.topk(mean, min(top_k, block.shape[1])).indices.tolist():
            moved = torch.topk(block[:, j].abs(), min(3, block.shape[0])).indices.tolist()
            lines.append(f"| {ids['train'][j]} | " + ", ".join(
                f"{shorten(text[chars[q][t][0]:chars[q][t][1]] or '(end)', 20)!r} ({block[t, j]:.3g})"
                for t in moved) + " |")
        lines.append("")
    texts = train_texts(run, set(hits))
    if texts:
        lines += ["## Training texts", ""] + [f"- {ids['train'][j]}: {shorten(texts[j])}" for j in sorted(texts)]
    atomic_write_text(folder / "tokens.md", "\n".join(lines) + "\n")
    info = {"measure": measure, "signal": signal, "perturbations": k_count, "queries": [ids["query"][q] for q in chosen],
            "shape": [len(cols), len(ids["train"])], "files": str(folder)}
    atomic_write_text(folder / "tokens.json", json.dumps(info, indent=1) + "\n")
    return {**info, "table": "\n".join(lines[:40]),
            "files_line": f"per-token scores: {folder / 'tokens.safetensors'}   table: {folder / 'tokens.md'}"}
