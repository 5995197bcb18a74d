"""Black-box Daunce: K fine-tuning jobs on random subsets D_k, per-example signals from response log-probabilities,
covariance over k. Only a backend's "fine-tune" and "log-probs of this response" are used (docs/design.md, Daunce).

The run directory is a Daunce store (`llm_attr.store`, method `daunce`, shards `perturbation-KKKKK` with
`train_loss`, `query_loss`, `train_margin`, `query_margin`, `subset`), so `llm-attr score RUN` (and `--self`) work
on it unchanged. Its manifest also holds `jobs`: for each k the job id (written atomically right after submission,
before any waiting), the fine-tuned model id and the state (`submitting` -> `submitted` -> `trained` -> `scored`).
With a backend that gives per-token log-probabilities (`Backend.token_logprobs`: local, openai) the shards also hold
each query token's loss and margin and the store the tokens' characters, as white-box Daunce's do
(`methods.daunce_tokens`): `query_span` (`--query-span`) scores a span (its mean token loss or margin), and
`llm-attr score RUN --query-span ...` / `--per-token` rescore the store without a job; another backend refuses spans.
A re-run of the same command waits for recorded jobs and never submits one twice; a job whose submission was
interrupted before its id was written is looked up by its tag (`Backend.find_job`) before it is submitted again.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import pipeline
from ..backends.base import (
    Backend,
    CostNotConfirmed,
    JobFailedError,
    signals_from_token_logprobs,
    token_signals,
)
from ..backends.local import LocalBackendArgs
from ..backends.openai_api import OpenAIBackendArgs
from ..config import to_dict
from ..context import single_process
from ..data import spans
from ..data.records import Record, as_records
from ..errors import ConfigError, RunDirError
from ..faults import fault_point
from ..io import contained_path, run_lock
from ..store import Store
from ..utils import Overall
from . import daunce_tokens
from .daunce import METHOD, RUN_OUTPUTS, perturbation_plan, score_run, shard_name

logger = logging.getLogger(__name__)

#: Config keys that do not change the shards: a re-run may change them (K may grow: only new jobs run).
SHARD_NEUTRAL_KEYS = ("perturbations", "measure", "signal", "max_active_jobs", "local", "openai", "query_span")


@dataclass
class BlackBoxConfig:
    """`llm-attr daunce --backend ...` config (YAML and `--set`): the jobs, the scoring, each backend's section."""

    perturbations: int = field(default=32, metadata={"help": "K, the number of fine-tuning jobs"})
    subsample_ratio: float = field(default=0.5, metadata={"help": "fraction r of the training set in each D_k"})
    epochs: float = field(default=1.0, metadata={"help": "epochs of each job over its D_k (openai: whole number)"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimiser step of each job"})
    learning_rate: float = field(default=3e-4, metadata={"help": "local backend: the AdamW learning rate"})
    learning_rate_multiplier: float | None = field(
        default=None, metadata={"help": "openai backend: the service's multiplier (null: its default)"})
    seed: int = field(default=0, metadata={"help": "job k draws D_k and its seed from (seed, k)"})
    measure: Literal["cov", "corr"] = field(default="corr", metadata={"help": "score: covariance or correlation"})
    signal: Literal["loss", "margin"] = field(default="margin", metadata={"help": "score: loss or margin rows"})
    query_span: str = field(default=spans.RESPONSE, metadata={
        "help": "score (backends with per-token log-probs: local, openai): " + spans.HELP})
    max_active_jobs: int = field(default=0, metadata={"help": "jobs submitted ahead of the one waited on "
                                                                "(0: all K at once)"})
    local: LocalBackendArgs = field(default_factory=LocalBackendArgs,
                                    metadata={"help": "--backend local: the fine-tune each job runs on this machine"})
    openai: OpenAIBackendArgs = field(default_factory=OpenAIBackendArgs,
                                      metadata={"help": "--backend openai: the fine-tuning API and its limits"})

    def __post_init__(self) -> None:
        if self.perturbations < 2:
            raise ValueError(f"perturbations must be >= 2 (a covariance over k needs two), got {self.perturbations}")
        if not 0.0 < self.subsample_ratio < 1.0:
            raise ValueError(f"subsample_ratio must be in (0, 1): black-box Daunce's only perturbation is the "
                             f"subset D_k, got {self.subsample_ratio}")
        if self.epochs <= 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs and learning_rate must be > 0 and batch_size >= 1")
        if self.seed < 0 or self.max_active_jobs < 0:
            raise ValueError("seed and max_active_jobs must be >= 0")
        spans.check_span(self.query_span)

    def hyperparameters(self) -> dict[str, Any]:
        """What `Backend.submit_finetune` receives (see `llm_attr.backends.base`)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "learning_rate_multiplier": self.learning_rate_multiplier}


def make_backend(name: str, config: BlackBoxConfig) -> Backend:
    """`local` or `openai`, configured from the config's section of that name."""
    if name == "local":
        from ..backends.local import LocalBackend

        return LocalBackend(config.local)
    if name == "openai":
        from ..backends.openai_api import OpenAIBackend

        return OpenAIBackend(config.openai)
    raise ConfigError(f"unknown backend {name!r}; expected local or openai")


def job_seed(seed: int, k: int) -> int:
    """The seed passed to job k (fits the 31-bit seeds services accept)."""
    return perturbation_plan(seed, k, 1, 1.0).order_seed % (2**31 - 1)


# ---------------------------------------------------------------------- the cost estimate


@dataclass
class CostEstimate:
    """Tokens this run will still pay for: training Σ_k tokens(D_k) x epochs, scoring K x tokens(train + query)."""

    jobs_to_submit: int
    train_tokens: int
    jobs_to_score: int
    score_tokens: int
    exact: bool
    price_train_per_mtok: float | None = None
    price_score_per_mtok: float | None = None

    def dollars(self) -> float | None:
        if self.price_train_per_mtok is None or self.price_score_per_mtok is None:
            return None
        return (self.train_tokens * self.price_train_per_mtok + self.score_tokens * self.price_score_per_mtok) / 1e6

    def __str__(self) -> str:
        approx = "" if self.exact else "≈"
        usd = self.dollars()
        cost = f"; about ${usd:,.2f} at the configured prices" if usd is not None else (
            "; set openai.price_train_per_mtok / price_score_per_mtok to see dollars")
        how = "" if self.exact else " (no tokenizer: ~4 characters per token; set openai.tokenizer for exact counts)"
        return (f"cost estimate: {self.jobs_to_submit} fine-tuning job(s) to submit, {approx}{self.train_tokens:,} "
                f"training tokens (subset tokens x epochs); {self.jobs_to_score} model(s) to score, "
                f"{approx}{self.score_tokens:,} tokens to score{cost}{how}")


def confirm_on_terminal(estimate: CostEstimate) -> bool:
    """Ask on the terminal whether to submit (the estimate is printed already); refuse (raise) without one."""
    if not sys.stdin or not sys.stdin.isatty():
        raise CostNotConfirmed("paid fine-tuning jobs need confirmation and stdin is not a terminal: pass --yes "
                               "(Python: run(..., yes=True)) to submit them; nothing was submitted")
    answer = input(f"Submit {estimate.jobs_to_submit} paid fine-tuning job(s)? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


# ---------------------------------------------------------------------- the method


def check_local_jobs(jobs: dict[str, Any], work_dir: Path, manifest: Path) -> None:
    """Refuse job records (read from `manifest`) whose job or model id leaves the local backend's `work_dir`."""
    for k, entry in jobs.items():
        if not isinstance(entry, dict):
            raise RunDirError(f"{manifest}: field 'jobs.{k}' must be an object")
        if entry.get("job_id"):
            name = entry["job_id"]
            if not isinstance(name, str) or len(Path(name).parts) != 1:
                raise RunDirError(f"{manifest}: field 'jobs.{k}.job_id' ({name!r}) must be a plain job folder name")
            contained_path(work_dir, name, f"{manifest}: field 'jobs.{k}.job_id'")
        if entry.get("model_id"):
            contained_path(work_dir, entry["model_id"], f"{manifest}: field 'jobs.{k}.model_id'", as_given=True)


class BlackBoxDaunce:
    """`BlackBoxDaunce(config, backend).run(model, train, query, out)`: K jobs -> store of signals -> scores.

    Before any paid job is submitted the cost estimate is printed (stderr) and `confirm(estimate) -> bool` asked
    (default: on the terminal); `yes=True` in `run` skips the question. Free backends (local) are never asked.
    """

    def __init__(self, config: BlackBoxConfig | None = None, backend: Backend | None = None, *,
                 confirm: Callable[[CostEstimate], bool] = confirm_on_terminal):
        self.config = config or BlackBoxConfig()
        if backend is None:
            from ..backends.local import LocalBackend

            backend = LocalBackend(self.config.local)
        self.backend = backend
        self.confirm = confirm
        self.estimate: CostEstimate | None = None  # of the last run
        self.submitted: list[int] = []  # jobs submitted by the last run
        self.scores: dict[str, Any] | None = None  # figures and text table of the last run's scoring

    def _on_submitted(self, k: int, job_id: str) -> None:
        """Called after job k's id is in the manifest and before waiting (a hook for tests)."""

    def featurize_config(self) -> dict[str, Any]:
        """What determines the shards: the config minus shard-neutral keys, plus the backend's identity."""
        cfg = {k: v for k, v in to_dict(self.config).items() if k not in SHARD_NEUTRAL_KEYS}
        return {**cfg, "backend": self.backend.identity()}

    def run(self, model: str, train: str | Path | list, query: str | Path | list, out: str | Path, *,
            yes: bool = False, overwrite: bool = False, score: bool = True, top_k: int = 10) -> Path:
        """Submit the missing jobs, wait for each, record its signals as one shard, then score; returns `out`.

        model: the base the backend fine-tunes (local: `builtin:tiny`, a model dir or a fine-tuned run dir;
        openai: the service's model id). train, query: JSONL paths, dataset dirs or lists of records.
        """
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("black-box Daunce runs in one process (its jobs run in parallel on the backend); "
                              "start it without `accelerate launch`")
        with run_lock(out, "daunce (black-box)"):
            return self._run(str(model), train, query, Path(out), yes=yes, overwrite=overwrite, score=score,
                             top_k=top_k)

    def _run(self, model: str, train: str | Path | list, query: str | Path | list, out: Path, *, yes: bool,
             overwrite: bool, score: bool, top_k: int) -> Path:
        cfg, backend = self.config, self.backend
        train_records, query_records = as_records(train), as_records(query)
        if Path(model).exists():
            from ..models.loading import canonical_spec

            model = canonical_spec(model)
        backend.prepare(out)
        fp, parts = pipeline.run_fingerprint("daunce-blackbox", backend.model_fingerprint(model), train_records,
                                    query_records, self.featurize_config())
        header = {
            "config": to_dict(cfg),
            "model": {"spec": model, "fingerprint": backend.model_fingerprint(model), "adapter": "new"},
            "blackbox": {"backend": backend.identity(), "first_order": False},
            "ids": {"train": [r.id for r in train_records], "query": [r.id for r in query_records]},
            "shapes": {"train_signal": [len(train_records)], "query_signal": [len(query_records)]},
            "dtype": "float32",
            "signals": list(backend.signals),
            "perturbations": cfg.perturbations,
        }
        if cfg.signal not in backend.signals:
            raise ConfigError(f"signal: {cfg.signal} is not available from the {backend.name} backend "
                              f"(it gives {list(backend.signals)})")
        source = str(query) if isinstance(query, (str, Path)) else "query"
        if not spans.is_whole(cfg.query_span):  # checked before any job is submitted
            if not backend.token_logprobs:
                raise ConfigError(span_refusal(backend.name))
            for row, record in enumerate(query_records):
                spans.char_span(record, cfg.query_span, source, row)
        store = pipeline.open_store(out, method=METHOD, fingerprint=fp, parts=parts, header=header, state=single_process(),
                           inputs={"train": train, "query": query, "model": model}, train=train_records,
                           query=query_records, overwrite=overwrite, outputs=("jobs", *RUN_OUTPUTS))
        if overwrite:
            store.update_manifest(jobs={})
        per_token = self._per_token_rows(store)
        store.update_manifest(measurement={"query_span": cfg.query_span, "per_token": per_token})

        todo = [k for k in range(cfg.perturbations) if store.missing([shard_name(k)])]
        plans = {k: perturbation_plan(cfg.seed, k, len(train_records), cfg.subsample_ratio) for k in todo}
        jobs: dict[str, dict[str, Any]] = dict(store.manifest.get("jobs", {}))
        if backend.name == "local":  # its job ids and model ids are paths under OUT/jobs
            check_local_jobs(jobs, backend.work_dir, out / "manifest.json")
        tag_of = {k: f"llm-attr-{fp}-{k:05d}" for k in todo}
        for k in todo:  # adopt jobs submitted by a run killed before it could write their ids
            entry = jobs.get(str(k), {})
            if entry.get("state") == "submitting" and not entry.get("job_id"):
                found = backend.find_job(tag_of[k])
                if found:
                    logger.info("job %d: adopting job %s found by its tag (its submission was interrupted)", k, found)
                    jobs[str(k)] = {**entry, "job_id": found, "state": "submitted"}
                    store.update_manifest(jobs=jobs)
        to_submit = [k for k in todo if not jobs.get(str(k), {}).get("job_id")]
        logger.info("black-box Daunce (%s backend): %d of %d jobs to run, %d of them to submit", backend.name,
                    len(todo), cfg.perturbations, len(to_submit))

        self.estimate = self._estimate(model, train_records, query_records, plans, to_submit, todo)
        if to_submit and backend.paid:
            print(self.estimate, file=sys.stderr)
            if not yes and not self.confirm(self.estimate):
                raise CostNotConfirmed("cost estimate not confirmed; nothing was submitted")
        else:
            logger.info("%s", self.estimate)

        self.submitted = []
        everything = [*train_records, *query_records]
        window = cfg.max_active_jobs or len(todo)
        overall = Overall(cfg.perturbations, "fine-tuning job", done=cfg.perturbations - len(todo), log=logger)
        for i, k in enumerate(todo):
            for kk in todo[i : i + window]:
                if not jobs.get(str(kk), {}).get("job_id"):
                    self._submit(store, jobs, kk, model, [train_records[j] for j in plans[kk].subset.tolist()],
                                 tag_of[kk])
            entry = jobs[str(k)]
            t0 = time.time()
            try:
                model_id = entry.get("model_id") or backend.wait(entry["job_id"])
            except JobFailedError as e:  # recorded; the next run submits job k again
                failed = [*entry.get("failed_job_ids", []), entry["job_id"]]
                jobs[str(k)] = {**entry, "job_id": None, "state": "failed", "error": str(e), "failed_job_ids": failed}
                store.update_manifest(jobs=jobs)
                raise JobFailedError(f"{e}; recorded in {out / 'manifest.json'}: re-run the same command to submit "
                                     f"job {k} again") from None
            if entry.get("model_id") != model_id:
                jobs[str(k)] = entry = {**entry, "model_id": model_id, "state": "trained"}
                store.update_manifest(jobs=jobs)
            if per_token:
                tensors, chars = self._signals_with_tokens(model_id, train_records, query_records, source)
            else:
                signals = backend.response_signals(model_id, everything)
                n = len(train_records)
                tensors = {f"train_{s}": signals[s][:n].float() for s in backend.signals}
                tensors.update({f"query_{s}": signals[s][n:].float() for s in backend.signals})
            tensors["subset"] = plans[k].subset
            store.write_shard(shard_name(k), tensors, meta={
                "k": k, "seed": [cfg.seed, k], "job_seed": entry["seed"], "job_id": entry["job_id"],
                "model_id": model_id, "backend": backend.name, "seconds": round(time.time() - t0, 3)})
            if per_token:
                daunce_tokens.write_token_layout(store, chars)
            jobs[str(k)] = {**entry, "state": "scored"}
            store.update_manifest(jobs=jobs)
            logger.debug("job %d (%s): signals of %d examples written", k, entry["job_id"], len(everything))
            overall.update()
        overall.close()

        pipeline.finish(store, [shard_name(k) for k in range(cfg.perturbations)], single_process(), "jobs")
        self.scores = score_run(out, measure=cfg.measure, signal=cfg.signal, top_k=top_k,
                                query_span=cfg.query_span) if score else None
        return out

    def _per_token_rows(self, store: Store) -> bool:
        """Whether this run's shards hold per-token query rows: the backend gives them, and a store resumed from
        shards without them (written before they existed) stays whole-response only (spans then refused)."""
        if not self.backend.token_logprobs:
            return False
        done = [k for k in range(self.config.perturbations) if not store.missing([shard_name(k)])]
        if not done or not store.missing([daunce_tokens.TOKENS_SHARD]):
            return True
        if "query_token_loss" in store.read_shard(shard_name(done[0])):
            return True
        if not spans.is_whole(self.config.query_span):
            raise RunDirError(f"{store.root}: its shards hold whole-response query rows only (written before "
                              "black-box per-token rows); re-run with --overwrite to measure --query-span")
        return False

    def _signals_with_tokens(self, model_id: str, train_records: list[Record], query_records: list[Record],
                             source: str):
        """(shard tensors: the training rows, the queries' whole-response rows and per-token rows; the queries'
        token characters). The span of each query must cover a token (`DataError` naming it otherwise)."""
        backend = self.backend
        signals = backend.response_signals(model_id, train_records)
        tokens = backend.response_token_logprobs(model_id, query_records)
        chars = [t.chars for t in tokens]
        spans.span_masks(query_records, chars, self.config.query_span, source)
        whole = signals_from_token_logprobs([t.logprobs for t in tokens])
        per_token = [token_signals(t.logprobs) for t in tokens]
        tensors = {f"train_{s}": signals[s].float() for s in backend.signals}
        tensors.update({f"query_{s}": whole[s].float() for s in backend.signals})
        tensors.update(daunce_tokens.token_tensors({s: [p[s] for p in per_token] for s in backend.signals}))
        return tensors, chars

    def _submit(self, store: Store, jobs: dict[str, dict[str, Any]], k: int, model: str, records: list[Record],
                tag: str) -> None:
        """Submit job k; its id goes into the manifest (atomically) before anything waits on it."""
        seed = job_seed(self.config.seed, k)
        jobs[str(k)] = {**jobs.get(str(k), {}), "state": "submitting", "tag": tag, "seed": seed,
                        "n_records": len(records)}
        store.update_manifest(jobs=jobs)
        job_id = self.backend.submit_finetune(model, records, self.config.hyperparameters(), seed, tag=tag)
        jobs[str(k)] = {**jobs[str(k)], "job_id": job_id, "state": "submitted", "submitted_at": time.time()}
        store.update_manifest(jobs=jobs)
        self.submitted.append(k)
        self._on_submitted(k, job_id)
        fault_point("job_submitted")

    def _estimate(self, model: str, train_records: list[Record], query_records: list[Record], plans: dict,
                  to_submit: list[int], todo: list[int]) -> CostEstimate:
        tokens, exact = self.backend.count_tokens(model, [*train_records, *query_records])
        train_tokens = sum(sum(tokens[j] for j in plans[k].subset.tolist()) for k in to_submit)
        args = self.config.openai if self.backend.name == "openai" else None
        return CostEstimate(
            jobs_to_submit=len(to_submit),
            train_tokens=math.ceil(train_tokens * self.config.epochs),
            jobs_to_score=len(todo),
            score_tokens=len(todo) * sum(tokens),
            exact=exact,
            price_train_per_mtok=args.price_train_per_mtok if args else None,
            price_score_per_mtok=args.price_score_per_mtok if args else None,
        )


# ---------------------------------------------------------------------- the CLI


def span_refusal(backend: str) -> str:
    """Why black-box Daunce through `backend` takes no `--query-span` (one line)."""
    return (f"query_span: the {backend} backend gives no per-token log-probabilities of a response (with each "
            "token's characters), which a span needs; measure the whole response (--query-span response), use a "
            "backend that gives them (local, openai) or white-box `llm-attr daunce`")


def cli_daunce(args: argparse.Namespace) -> None:
    """`llm-attr daunce --backend local|openai ...` (called by `llm_attr.cli`)."""
    from ..config import load_config

    config = load_config(BlackBoxConfig, args.config, args.overrides)
    if getattr(args, "query_span", None):  # set after YAML parsing: a regex is never read as YAML
        config.query_span = spans.check_span(args.query_span)
    method = BlackBoxDaunce(config, make_backend(args.backend, config))
    out = method.run(args.model, args.train, args.query, args.out, yes=getattr(args, "yes", False),
                     overwrite=args.overwrite, score=not args.no_score, top_k=args.top_k)
    if method.scores is not None:
        print(method.scores["table"])
        print(f"scores: {out / 'scores.safetensors'}   top-k table: {out / 'topk.md'}")

