"""The Daunce store: its shards' names, scoring them (covariance or correlation over k, self-influence), and new
queries against the kept adapters (`llm-attr query`). One shard per perturbation k (`perturbation-KKKKK`:
`train_loss`, `train_margin` `[N]`, `query_loss`, `query_margin` `[Q]`, the per-token `query_token_loss`,
`query_token_margin` `[R]`, `subset`, `xi`), the queries' token layout (`query-tokens`, `daunce_tokens`) and, with
`keep_adapters`, the adapter θ_k under `adapters/KKKKK`. Black-box Daunce writes the same store kind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import pipeline
from ..data import spans
from ..data.records import as_records, save_jsonl
from ..data.tokenize import pad_id_of, tokenize_records
from ..errors import ConfigError, RunDirError
from ..fingerprints import model_fingerprint
from ..io import contained_path, fingerprint, locked
from ..losses import Signal, evaluate_signal
from ..reduced_head import reduced_head
from ..runner import load_target
from ..scoring import (
    Measure,
    ScoreFile,
    as_tensor,
    covariance_scores,
    load_scores,
    prepare_train_signals,
    scores_line,
    self_influence,
    write_scoring,
    write_self_influence,
)
from ..store import Store, input_copy, run_input
from . import daunce_tokens
from .daunce_blocks import stacked_block_rows, uses_blocks

logger = logging.getLogger(__name__)

METHOD = "daunce"
SIGNALS: tuple[Signal, ...] = ("loss", "margin")


def shard_name(k: int) -> str:
    return f"perturbation-{k:05d}"


def adapter_dir(run: Path, k: int) -> Path:
    return Path(run) / "adapters" / f"{k:05d}"


# ---------------------------------------------------------------------- scoring a run, querying an index


def _signal_rows(store: Store, k_count: int, key: str, blocks: bool = False) -> torch.Tensor:
    """`[K, n]` float32: tensor `key` of the first `k_count` perturbation shards; with `blocks`, `[K·B, n]` of
    their block rows, each block centred over k (`daunce_blocks.stacked_block_rows`)."""
    if blocks:
        return stacked_block_rows([store.read_shard(shard_name(k))[f"{key}_blocks"] for k in range(k_count)]).float()
    return torch.stack([store.read_shard(shard_name(k))[key] for k in range(k_count)])


def _check_k(store: Store, perturbations: int | None) -> int:
    manifest = store.manifest
    k_count = perturbations or manifest["perturbations"]
    if k_count < 2:
        raise ConfigError(f"scoring needs at least 2 perturbations, got {k_count}")
    missing = store.missing([shard_name(k) for k in range(k_count)])
    if missing:
        raise RunDirError(f"{store.root}: {len(missing)} of the first {k_count} perturbation shards are missing or "
                          f"corrupted ({missing[:3]}...); re-run `llm-attr daunce` with the same arguments to compute them")
    return k_count


def prepared_train_signals(store: Store, k_count: int, signal: str, measure: Measure,
                           blocks: bool = False) -> np.ndarray:
    """`[K, N]` float32 memory-mapped: the first `k_count` shards' train signals centred and scaled for `measure`
    (`scoring.prepare_train_signals`), computed once and kept in RUN/prepared/ (as large as the signals it
    prepares), keyed by the shards' checksums so that a recomputed shard is never scored with stale data."""
    names = [shard_name(k) for k in range(k_count)]
    n_train = len(store.manifest["ids"]["train"])
    key = fingerprint([store.shard_info(n)["sha256"] for n in names])
    n_blocks = store.read_shard(names[0])[f"train_{signal}_blocks"].shape[0] if blocks else 1
    path = store.root / "prepared" / f"train_{signal}_{measure}_K{k_count}{'_blocks' if blocks else ''}.safetensors"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                if (f.metadata() or {}).get("key") == key:
                    return load_scores(path, name="signals")
        except Exception as e:  # a torn or foreign file: prepare it again
            logger.warning("%s: unreadable (%s); preparing it again", path, e)

    def read(start: int, stop: int) -> torch.Tensor:
        if blocks:
            return stacked_block_rows([store.read_columns(n, f"train_{signal}_blocks", start, stop) for n in names])
        return torch.stack([store.read_slice(n, f"train_{signal}", start, stop) for n in names])

    sf = ScoreFile(path, (k_count * n_blocks, n_train), name="signals", metadata={"key": key, "measure": measure})
    try:
        prepare_train_signals(read, sf.array, measure=measure, n_train=n_train)
    except BaseException:
        sf.abort()
        raise
    sf.commit()
    return load_scores(path, name="signals")


def scoring_tag(measure: str, signal: str, k_count: int, blocks: bool = False) -> str:
    """The name of one Daunce scoring's files under `RUN/scorings/`: e.g. `corr-margin-K32` (`-blocks`: block rows)."""
    return f"{measure}-{signal}-K{k_count}" + ("-blocks" if blocks else "")


def write_scores(out: Path, query_signals: torch.Tensor, run: Path, store: Store, k_count: int, signal: str,
                 measure: Measure, query_ids: list[str], top_k: int, meta: dict[str, Any],
                 query_span: str | None = None, blocks: bool = False) -> dict[str, Any]:
    """Score `query_signals [K, Q]` (`[K·B, Q]` with `blocks`) against the store's train signals into `out`
    (`scoring.write_scoring`); `query_span`: the measurement the query signals are of (named in the tag, the title
    and scores.json)."""
    prepared = prepared_train_signals(store, k_count, signal, measure, blocks)

    def fill(array: np.ndarray) -> None:
        covariance_scores(query_signals, as_tensor(prepared), measure=measure, out=array, prepared=True)

    whole = spans.is_whole(query_span)
    measured = {} if whole else {"query_span": query_span}
    rows = {"rows": "blocks"} if blocks else {}
    return write_scoring(out, tag=scoring_tag(measure, signal, k_count, blocks) + spans.span_tag(query_span),
                         query_ids=query_ids, train_ids=store.manifest["ids"]["train"], fill=fill, texts_from=run,
                         title=f"Daunce top-{top_k} ({measure} of {signal}, K={k_count}"
                               + (", block rows" if blocks else "")
                               + ("" if whole else f"; query span {query_span!r}") + ")", top_k=top_k,
                         info={"measure": measure, "signal": signal, "perturbations": k_count, **rows, **measured,
                               **meta},
                         metadata={"measure": measure, "signal": signal, "perturbations": k_count, **rows,
                                   **measured},
                         queries=spans.marked_queries(run_input(out, "query"), query_span))


@locked("daunce scoring", dir_arg="run")
def score_run(run: str | Path, *, measure: Measure = "corr", signal: Signal = "margin",
              perturbations: int | None = None, top_k: int = 10, query_span: str | None = None,
              per_token: bool = False, query_id: str | None = None, rows: str | None = None) -> dict[str, Any]:
    """Score a Daunce run's queries from its store: RUN/scores.safetensors, ids.json, topk.md, scores.json.
    `rows`: full | blocks (the block rows of `row_blocks`, whole responses only); default blocks when recorded.
    `perturbations`: the first K shards only (default: the run's K). `query_span`: the query measurement
    (`data.spans`; default `response`), from the stored per-token rows. `per_token`: instead, per-token scores of
    the queries (`query_id`: one) under RUN/scorings/<tag>-tokens/. Returns the figures and a text table."""
    run = Path(run)
    store = Store.open(run, METHOD)
    k_count = _check_k(store, perturbations)
    blocks = uses_blocks(store, rows)
    if blocks and (per_token or not spans.is_whole(query_span)):
        if rows == "blocks":
            raise ConfigError("block rows are recorded for whole responses only: score a span or per-token with "
                              "--rows full")
        logger.info("a span or per-token scoring: the full rows (block rows hold whole responses only)")
        blocks = False
    if per_token:
        prepared = prepared_train_signals(store, k_count, signal, measure)
        tag = scoring_tag(measure, signal, k_count) + spans.span_tag(query_span)
        return daunce_tokens.write_token_scores(run, store, prepared, k_count, signal, measure, tag, query_id,
                                                query_span, top_k)
    if spans.is_whole(query_span):
        query = _signal_rows(store, k_count, f"query_{signal}", blocks)
    else:
        query = daunce_tokens.span_rows(run, store, k_count, signal, query_span)
    return write_scores(run, query, run, store, k_count, signal, measure, store.manifest["ids"]["query"], top_k,
                        {"run": str(run)}, query_span=query_span, blocks=blocks)


@locked("daunce self-influence", dir_arg="run")
def score_self_influence(run: str | Path, *, signal: Signal = "margin", perturbations: int | None = None,
                         top_k: int = 10) -> dict[str, Any]:
    """Self-influence: variance over k of each training example's signal -> RUN/self_influence.{safetensors,md}
    (kept per signal and K under RUN/scorings/self-SIGNAL-KK/)."""
    run = Path(run)
    store = Store.open(run, METHOD)
    k_count = _check_k(store, perturbations)
    train_ids = store.manifest["ids"]["train"]
    names = [shard_name(k) for k in range(k_count)]

    def read(start: int, stop: int) -> torch.Tensor:
        return torch.stack([store.read_slice(n, f"train_{signal}", start, stop) for n in names])

    variance = self_influence(read, n_train=len(train_ids))
    table = write_self_influence(run, tag=f"self-{signal}-K{k_count}", variance=variance, train_ids=train_ids,
                                 title=f"Self-influence: variance of the {signal} over K={k_count} perturbations",
                                 top_k=top_k)
    return {"signal": signal, "perturbations": k_count, "table": table, "self_influence": variance}


@locked("daunce query")
def query_run(run: str | Path, query: str | Path | list, out: str | Path, *, measure: Measure | None = None,
              signal: Signal | None = None, perturbations: int | None = None, top_k: int = 10,
              batch_size: int | None = None, query_span: str | None = None) -> dict[str, Any]:
    """Score new queries against a Daunce index: K forward passes with the kept adapters, the stored train signals.

    Writes OUT/scores.safetensors, ids.json, topk.md, scores.json and query_signals.safetensors (`loss`, `margin`
    `[K, Q]`, to rescore without the model). Returns the figures and a text table.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from ..io import atomic_write
    from ..models.loading import adapter_of, auto_device, load_model
    from .daunce_newton import mirror_state

    run, out = Path(run), Path(out)
    pipeline.check_out(out, "query", {"run": run, "query": query}, resumable=pipeline.QUERY_OUTPUTS)
    store = Store.open(run, METHOD)
    manifest = store.manifest
    cfg = manifest["config"]
    measure, signal = measure or cfg["measure"], signal or cfg["signal"]
    query_span = query_span or cfg.get("query_span", spans.RESPONSE)
    k_count = _check_k(store, perturbations)
    for k in range(k_count):  # the adapter index: each RUN/adapters/k must lie inside the run (no symlink out)
        contained_path(run, str(adapter_dir(run, k).relative_to(run) / "adapter_model.safetensors"),
                       f"{run}: adapter index, perturbation {k}")
    missing = [k for k in range(k_count) if not (adapter_dir(run, k) / "adapter_model.safetensors").is_file()]
    if missing:
        raise RunDirError(f"{run}: adapters of perturbations {missing[:5]} are missing (run made with "
                          "keep_adapters: false?); `llm-attr query` needs them")
    spec = manifest["model"]["spec"]
    if model_fingerprint(spec) != manifest["model"]["fingerprint"]:
        raise RunDirError(f"{run}: the model {spec} has changed since this index was built (fingerprint differs)")
    device, theta0 = auto_device(), None  # theta0: the target's own adapter state (adapter: continue)
    if manifest["model"]["adapter"] == "new":
        loaded = load_model(spec, device=device, dtype=cfg.get("dtype", "auto"))
        base, tokenizer = loaded.model, loaded.tokenizer
    else:
        if adapter_of(spec) is None:
            raise RunDirError(f"{run}: adapter: continue index whose model {spec} has no LoRA adapter")
        base, tokenizer = load_target(spec, "continue", device, cfg.get("dtype", "auto"))
        theta0 = {n: v.detach().clone() for n, v in get_peft_model_state_dict(base).items()}
        base = base.unload()  # the kept adapters replace the target's own
    records = as_records(query)
    source = str(query) if isinstance(query, (str, Path)) else "query"
    examples, _ = tokenize_records(records, tokenizer, cfg["max_length"], source=source)
    examples = spans.span_examples(records, examples, tokenizer, query_span, source)
    pad_id = pad_id_of(tokenizer)
    model = PeftModel.from_pretrained(base, str(adapter_dir(run, 0)), is_trainable=False)
    rows = {s: [] for s in SIGNALS}
    if theta0 is not None:  # θ₀, where the run's reduced lm_head is built for these queries
        set_peft_model_state_dict(model, theta0)
    head = reduced_head(model, examples, pad_id, top_k=cfg.get("head_top_k", 0), batch_size=cfg["eval_batch_size"],
                        reference=contextlib.nullcontext if theta0 is not None else model.disable_adapter)
    evaluate = functools.partial(evaluate_signal, model, examples, pad_id, signal=SIGNALS,
                                 batch_size=batch_size or cfg["eval_batch_size"], head=head)
    for k in range(k_count):
        kept = load_file(str(adapter_dir(run, k) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, kept)
        values = evaluate()
        if cfg.get("antithetic"):  # the kept adapter is θ₀ + δ_k; the row is the half-difference with θ₀ − δ_k
            set_peft_model_state_dict(model, mirror_state(kept, manifest["model"]["adapter"], theta0))
            values = {s: (values[s] - m) / 2 for s, m in evaluate().items()}
        for s in SIGNALS:
            rows[s].append(values[s])
    signals = {s: torch.stack(rows[s]) for s in SIGNALS}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "query_signals.safetensors", lambda tmp: save_file(signals, tmp))
    save_jsonl(records, input_copy(out, "query"))
    return write_scores(out, signals[signal], run, store, k_count, signal, measure, [r.id for r in records],
                        top_k, {"run": str(run), "query": str(query) if isinstance(query, (str, Path)) else "records"},
                        query_span=query_span)


def score_cli(run: str | Path, *, top_k: int = 10, measure: Measure | None = None, signal: Signal | None = None,
              perturbations: int | None = None, self_influence: bool = False, query_span: str | None = None,
              per_token: bool = False, query_id: str | None = None, rows: str | None = None) -> dict[str, Any]:
    """`llm-attr score RUN [--measure --signal --perturbations --self --query-span --per-token --query-id --rows]`."""
    cfg = Store.open(run, METHOD).manifest["config"]
    signal = signal or cfg["signal"]
    if self_influence:
        info = score_self_influence(run, signal=signal, perturbations=perturbations, top_k=top_k)
        return {**info, "files": f"self-influence: {Path(run) / 'self_influence.safetensors'}"}
    query_span = query_span or cfg.get("query_span", spans.RESPONSE)
    info = score_run(run, measure=measure or cfg["measure"], signal=signal, perturbations=perturbations, top_k=top_k,
                     query_span=query_span, per_token=per_token, query_id=query_id, rows=rows)
    if per_token:
        return {**info, "files": info.pop("files_line")}
    return {**info, "files": scores_line(run)}


def query_cli(run: str | Path, query: str | Path, out: str | Path, *, top_k: int = 10, measure: Measure | None = None,
              signal: Signal | None = None, perturbations: int | None = None,
              query_span: str | None = None) -> dict[str, Any]:
    """`llm-attr query RUN --query Q --out OUT [--query-span S]` of a Daunce store (`query_run`)."""
    info = query_run(run, query, out, measure=measure, signal=signal, perturbations=perturbations, top_k=top_k,
                     query_span=query_span)
    return {**info, "files": scores_line(out)}
