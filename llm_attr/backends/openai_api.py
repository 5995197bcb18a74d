"""The `openai` backend: fine-tuning jobs and response log-probabilities through the official `openai` client.

Works with OpenAI and OpenAI-compatible services (base URL and key from `OPENAI_BASE_URL` / `OPENAI_API_KEY`).

- Training: the records are uploaded as a chat fine-tuning JSONL file (`{"messages": [...]}` per line,
  `purpose="fine-tune"`), then `fine_tuning.jobs.create(model, training_file, method=supervised(n_epochs,
  batch_size, learning_rate_multiplier), seed, suffix, metadata={"llm_attr_tag": tag})`. The tag lets a re-run
  find a job whose id was never written down (`find_job`).
- Waiting: `fine_tuning.jobs.retrieve` polled with exponential back-off (`poll_interval` x 1.5 per poll, at most
  `max_poll_interval`) until `succeeded` (-> `fine_tuned_model`), `failed` / `cancelled` (`JobFailedError` naming
  the job id and the service's error) or `job_timeout` seconds (`JobTimeoutError`; the job keeps running and a
  re-run of the same command waits for it again, never resubmits it). Transient errors while polling are logged and
  polling goes on.
- Log-probabilities of a FIXED response: chat endpoints only return log-probs of tokens the model samples, so the
  backend uses the completions endpoint with `echo=True, logprobs=1`: the service returns the log-prob of every
  token of the text it was sent, with each token's character offset. The text is the record rendered as the
  fine-tuned model saw it in training (the served model's chat template, from `tokenizer`, or `{prompt}\n{response}`
  without one); the response tokens are those whose offset lies within the response's characters. This needs a
  service that still offers echo with log-probs on the completions endpoint (vLLM and most OpenAI-compatible
  servers do; OpenAI's hosted chat models do not, so for them no fixed-response log-probs exist and this backend
  reports the service's error). Both signals come from it: `loss` (mean NLL) and `margin` (mean log-odds); and,
  from the same offsets, each response token's characters in the response text (`response_token_logprobs`), so
  black-box Daunce measures a query span (`--query-span`) through this backend too.
- Retries: the client retries 429 and 5xx responses and connection errors `max_retries` times with exponential
  back-off (honouring `Retry-After`); what still fails is raised as `BackendError` naming the call and the job.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.records import Record
from ..errors import ConfigError
from ..io import fingerprint
from ..utils import progress
from .base import (
    Backend,
    BackendError,
    JobFailedError,
    JobTimeoutError,
    TokenLogprobs,
    chat_jsonl,
    signals_from_token_logprobs,
)

logger = logging.getLogger(__name__)

RUNNING = ("validating_files", "queued", "running", "pending")
FAILED = ("failed", "cancelled")
TAG_KEY = "llm_attr_tag"


@dataclass
class OpenAIBackendArgs:
    """`openai:` section of the black-box config. The key and base URL come from the environment only."""

    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer with the served model's chat template (hub id, dir, builtin:tiny) to render records "
                "for scoring and to count tokens; null: `{prompt}\\n{response}` and ~4 characters per token"})
    poll_interval: float = field(default=5.0, metadata={"help": "first wait between job polls (s)"})
    max_poll_interval: float = field(default=120.0, metadata={"help": "longest wait between job polls (s)"})
    job_timeout: float = field(default=48 * 3600.0, metadata={"help": "give up waiting on one job after (s)"})
    request_timeout: float = field(default=600.0, metadata={"help": "timeout of one HTTP request (s)"})
    max_retries: int = field(default=6, metadata={"help": "client retries of 429 / 5xx / connection errors"})
    score_batch_size: int = field(default=16, metadata={"help": "records per completions request"})
    score_max_tokens: int = field(default=1, metadata={"help": "max_tokens of the echo request (some servers "
                                                                "refuse 0); generated tokens are ignored"})
    score_extra_body: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra JSON fields of the completions request, e.g. {add_special_tokens: false} for vLLM"})
    suffix: str = field(default="daunce", metadata={"help": "suffix of the fine-tuned models' names"})
    price_train_per_mtok: float | None = field(default=None, metadata={"help": "USD per 1M training tokens"})
    price_score_per_mtok: float | None = field(default=None, metadata={"help": "USD per 1M scored tokens"})

    def __post_init__(self) -> None:
        if self.poll_interval <= 0 or self.max_poll_interval < self.poll_interval:
            raise ValueError("need 0 < poll_interval <= max_poll_interval")
        if self.score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


def _require_openai():
    try:
        import openai
    except ImportError:
        raise BackendError("the openai backend needs the official client: pip install 'llm_attr[openai]' "
                           "(or pip install openai)") from None
    return openai


class ChatRenderer:
    """Renders a record as (prompt text, prompt + response text): with a tokenizer's chat template, or plain."""

    def __init__(self, tokenizer_spec: str | None):
        self.tokenizer = None
        if tokenizer_spec:
            from ..models.loading import _resolve_plain, is_run_dir, load_tokenizer, run_base

            spec = tokenizer_spec
            while is_run_dir(spec) and not (os.path.isfile(os.path.join(spec, "tokenizer_config.json"))):
                spec = run_base(spec)
            path, gguf = (spec, None) if is_run_dir(spec) else _resolve_plain(spec)
            self.tokenizer = load_tokenizer(path, gguf)

    def render(self, record: Record) -> tuple[str, str]:
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            chat = record.chat()
            prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
            if full.startswith(prompt):
                return prompt, full
            logger.debug("record %s: chat template re-renders the prompt; appending the response", record.id)
            return prompt, prompt + record.response_text()
        prompt = record.prompt_text() + "\n"
        return prompt, prompt + record.response_text()

    def count(self, record: Record) -> int:
        _, full = self.render(record)
        if self.tokenizer is None:
            return max(1, math.ceil(len(full) / 4))
        return len(self.tokenizer(full, add_special_tokens=False)["input_ids"])


class OpenAIBackend(Backend):
    """Fine-tuning jobs and echo log-probs on an OpenAI(-compatible) service. See the module docstring."""

    name = "openai"
    paid = True
    signals = ("loss", "margin")
    token_logprobs = True

    def __init__(self, args: OpenAIBackendArgs | None = None, *, client: Any = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.args = args or OpenAIBackendArgs()
        self._sleep = sleep
        self.openai = _require_openai()
        for name in ("httpx", "httpx2"):  # one INFO line per HTTP request (every poll) unless asked for
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        if client is None:
            key = os.environ.get("OPENAI_API_KEY")
            if not key:
                raise BackendError("the openai backend needs OPENAI_API_KEY in the environment "
                                   "(and OPENAI_BASE_URL for a service other than api.openai.com)")
            client = self.openai.OpenAI(api_key=key, base_url=os.environ.get("OPENAI_BASE_URL") or None,
                                        max_retries=self.args.max_retries, timeout=self.args.request_timeout)
        self.client = client
        self.base_url = str(client.base_url).rstrip("/")
        self._renderer: ChatRenderer | None = None

    @property
    def renderer(self) -> ChatRenderer:
        if self._renderer is None:
            self._renderer = ChatRenderer(self.args.tokenizer)
        return self._renderer

    # ------------------------------------------------------------------ protocol

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "service": self.base_url, "tokenizer": self.args.tokenizer,
                "score_max_tokens": self.args.score_max_tokens, "score_extra_body": self.args.score_extra_body}

    def model_fingerprint(self, base_model_id: str) -> str:
        return fingerprint({"service": self.base_url, "model": base_model_id})

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one client call; what still fails after the client's retries becomes a `BackendError` naming `what`."""
        openai = self.openai
        try:
            return fn()
        except openai.APIStatusError as e:
            raise BackendError(f"{what}: HTTP {e.status_code} from {self.base_url}: {_message(e)} "
                               f"(after {self.args.max_retries} retries where retryable)") from None
        except openai.APITimeoutError:
            raise BackendError(f"{what}: timed out after {self.args.request_timeout:g}s "
                               f"({self.args.max_retries} retries) at {self.base_url}") from None
        except openai.APIConnectionError as e:
            raise BackendError(f"{what}: cannot reach {self.base_url} ({e})") from None

    def submit_finetune(self, base_model_id: str, training_records: Sequence[Record],
                        hyperparameters: dict[str, Any], seed: int, *, tag: str | None = None) -> str:
        epochs = float(hyperparameters["epochs"])
        if epochs != int(epochs) or epochs < 1:
            raise ConfigError(f"openai backend: epochs must be a whole number >= 1 (n_epochs), got {epochs:g}")
        hp: dict[str, Any] = {"n_epochs": int(epochs), "batch_size": int(hyperparameters["batch_size"])}
        if hyperparameters.get("learning_rate_multiplier") is not None:
            hp["learning_rate_multiplier"] = float(hyperparameters["learning_rate_multiplier"])
        name = f"{tag or 'llm-attr'}.jsonl"
        blob = chat_jsonl(list(training_records)).encode()
        upload = self._call(f"uploading training file {name} ({len(blob)} bytes)", lambda: self.client.files.create(
            file=(name, blob, "application/jsonl"), purpose="fine-tune"))
        kwargs: dict[str, Any] = {"model": base_model_id, "training_file": upload.id, "seed": int(seed),
                                  "suffix": self.args.suffix,
                                  "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        if tag:
            kwargs["metadata"] = {TAG_KEY: tag}
        job = self._call(f"creating a fine-tuning job on {base_model_id} (file {upload.id})",
                         lambda: self.client.fine_tuning.jobs.create(**kwargs))
        logger.info("submitted fine-tuning job %s (%s, %d records, file %s, seed %d)", job.id, base_model_id,
                    len(training_records), upload.id, seed)
        return job.id

    def find_job(self, tag: str) -> str | None:
        page = self._call(f"listing fine-tuning jobs tagged {tag}",
                          lambda: self.client.fine_tuning.jobs.list(metadata={TAG_KEY: tag}, limit=100))
        for job in page.data:
            if (getattr(job, "metadata", None) or {}).get(TAG_KEY) == tag and job.status not in FAILED:
                return job.id
        return None

    def wait(self, job_id: str, *, timeout: float | None = None) -> str:
        openai = self.openai
        timeout = self.args.job_timeout if timeout is None else timeout
        start = time.monotonic()
        interval = self.args.poll_interval
        status = "unknown"
        while True:
            try:
                job = self.client.fine_tuning.jobs.retrieve(job_id)
            except openai.NotFoundError:
                raise JobFailedError(f"fine-tuning job {job_id}: not found at {self.base_url}") from None
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                logger.warning("polling fine-tuning job %s: %s; polling again in %.0fs", job_id, _message(e),
                               interval)
                job = None
            except openai.APIStatusError as e:
                raise BackendError(f"polling fine-tuning job {job_id}: HTTP {e.status_code}: {_message(e)}") from None
            if job is not None:
                status = job.status
                if status == "succeeded":
                    if not job.fine_tuned_model:
                        raise JobFailedError(f"fine-tuning job {job_id} succeeded but names no fine_tuned_model")
                    logger.info("fine-tuning job %s succeeded: %s", job_id, job.fine_tuned_model)
                    return job.fine_tuned_model
                if status in FAILED:
                    err = getattr(job, "error", None)
                    detail = f"{err.code}: {err.message}" if err is not None and err.message else "no error given"
                    raise JobFailedError(f"fine-tuning job {job_id} {status} ({detail})")
                if status not in RUNNING:
                    logger.warning("fine-tuning job %s: unknown status %r, still waiting", job_id, status)
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                raise JobTimeoutError(
                    f"fine-tuning job {job_id} still {status} after {elapsed:.0f}s (timeout {timeout:g}s); its id is "
                    "in the run's manifest: re-run the same command to keep waiting (it is not submitted again)")
            self._sleep(min(interval, max(0.0, timeout - elapsed)))
            interval = min(interval * 1.5, self.args.max_poll_interval)

    def response_signals(self, model_id: str, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        return signals_from_token_logprobs([t.logprobs for t in self.response_token_logprobs(model_id, records)])

    def response_token_logprobs(self, model_id: str, records: Sequence[Record]) -> list[TokenLogprobs]:
        """Echo log-probs of each record's response tokens, with the response characters each covers."""
        records = list(records)
        rendered = [self.renderer.render(r) for r in records]
        per_record: list[TokenLogprobs] = []
        bs = self.args.score_batch_size
        batches = [range(i, min(i + bs, len(records))) for i in range(0, len(records), bs)]
        for batch in progress(batches, desc=f"log-probs {model_id}", disable=len(batches) < 4):
            texts = [rendered[i][1] for i in batch]
            response = self._call(
                f"log-probs of records {records[batch[0]].id}..{records[batch[-1]].id} under {model_id}",
                lambda texts=texts: self.client.completions.create(
                    model=model_id, prompt=texts, echo=True, logprobs=1, max_tokens=self.args.score_max_tokens,
                    temperature=0.0, extra_body=self.args.score_extra_body or None))
            choices = sorted(response.choices, key=lambda c: c.index)
            if len(choices) != len(texts):
                raise BackendError(f"completions under {model_id}: {len(choices)} choices for {len(texts)} prompts")
            for i, choice in zip(batch, choices, strict=True):
                per_record.append(_response_logprobs(choice, *rendered[i], records[i], model_id))
        return per_record

    def count_tokens(self, base_model_id: str, records: Sequence[Record]) -> tuple[list[int], bool]:
        return [self.renderer.count(r) for r in records], self.renderer.tokenizer is not None


def _response_logprobs(choice: Any, prompt: str, full: str, record: Record, model_id: str) -> TokenLogprobs:
    """Log-probs of the tokens that start inside the response's characters `[len(prompt), len(full))`, and the
    characters of the response text each covers (up to the next token's offset; `(n, n)` for none)."""
    lp = choice.logprobs
    if lp is None or lp.token_logprobs is None or lp.text_offset is None:
        raise BackendError(f"record {record.id}: the service returned no echo log-probs under {model_id} "
                           "(it must support echo=True with logprobs on the completions endpoint)")
    offsets = [int(o) for o in lp.text_offset]
    picked = [i for i, (off, v) in enumerate(zip(offsets, lp.token_logprobs, strict=True))
              if len(prompt) <= off < len(full) and v is not None]
    if not picked:
        raise BackendError(f"record {record.id}: no response token in the echoed log-probs under {model_id}")
    text = record.response_text()
    base = full.find(text, len(prompt))
    n = len(text)
    chars = np.full((len(picked), 2), n, dtype=np.int32)
    if base >= 0:  # (else no token has characters: a span of this record is then refused as empty)
        for row, i in enumerate(picked):
            end = min(offsets[i + 1] if i + 1 < len(offsets) else len(full), len(full))
            lo, hi = min(max(offsets[i] - base, 0), n), min(max(end - base, 0), n)
            if hi > lo:
                chars[row] = (lo, hi)
    values = torch.tensor([float(lp.token_logprobs[i]) for i in picked], dtype=torch.float32)
    return TokenLogprobs(values, chars)


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)
