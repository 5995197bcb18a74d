"""The black-box backend protocol: "fine-tune this model on these records" and "log-probabilities of this response".

Black-box Daunce (`llm_attr.methods.blackbox`) needs nothing else from a model provider. A backend implements

    submit_finetune(base_model_id, training_records, hyperparameters, seed, tag=None) -> job_id    (returns at once)
    wait(job_id) -> model_id                                                                      (blocks)
    response_signals(model_id, records) -> {"loss": [N] float32, "margin": [N] float32 (if it can)}

and, where the service gives each token's log-probability with its characters (`token_logprobs = True`),

    response_token_logprobs(model_id, records) -> [TokenLogprobs(logprobs [R_i] float32, chars [R_i, 2] int32)]

the log-probability of every response token and the characters `[start, end)` of the record's response text it
covers (`(n, n)` for none: EOS, end of turn), as `data.spans.token_chars` gives them: what a query span needs
(`--query-span`: the span's mean token loss). A backend without it refuses spans in one line naming itself.

`response_logprobs(model_id, records)` is the protocol's minimal form: `[N]` float32, the mean NLL (nats) over each
record's response tokens. `margin` is the mean log-odds of the correct response token, log p − log(1 − p), which
needs only each response token's own log-probability, so any backend that returns per-token log-probabilities can
give it (`signals_from_token_logprobs`); a backend that only returns a mean NLL declares `signals = ("loss",)`.

`hyperparameters` is a mapping with the keys `epochs` (float), `batch_size` (int), `learning_rate` (absolute, for
backends that train themselves) and `learning_rate_multiplier` (for services that scale their own default; `None`:
the service's default). A backend ignores the keys it has no use for and rejects values it cannot honour.

`tag` is a string unique to (run, perturbation): a backend that can attach it to a job implements `find_job(tag)`,
so that a run killed between "job created" and "job id written to the manifest" adopts that job instead of paying
for a second one.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..data.records import Record
from ..errors import LlmAttrError

#: Characters per token assumed by the cost estimate when the backend has no tokenizer.
CHARS_PER_TOKEN = 4.0


class BackendError(LlmAttrError):
    """A backend call failed for good (after its retries): the message names the operation and the job/model."""


class JobFailedError(BackendError):
    """A fine-tuning job ended in `failed` or `cancelled`; the message names the job id and the service's error."""


class JobTimeoutError(BackendError):
    """A fine-tuning job did not finish in time; it is recorded in the run's manifest, so a re-run only waits."""


class CostNotConfirmed(LlmAttrError):
    """The cost estimate of paid jobs was not confirmed (answer no, or no terminal and no `--yes`)."""


class TokenLogprobs(NamedTuple):
    """One record's response tokens: `logprobs [R]` float32 (nats) and `chars [R, 2]` int32, the characters of the
    response text each token covers (`(n, n)` for a token with none)."""

    logprobs: torch.Tensor
    chars: np.ndarray


class Backend(ABC):
    """A provider of fine-tuning jobs and response log-probabilities. Subclass it to plug in your own service."""

    #: Short name, written to the run's manifest.
    name: str = "backend"
    #: True when submitting a job costs money: Black-box Daunce then asks for confirmation of the cost estimate.
    paid: bool = False
    #: The per-example signals `response_signals` returns (always "loss"; "margin" where per-token log-probs exist).
    signals: tuple[str, ...] = ("loss",)
    #: True when `response_token_logprobs` gives each response token's log-prob and characters (spans need it).
    token_logprobs: bool = False

    def prepare(self, run_dir: Path) -> None:
        """Called once before any job with the run directory, where the backend may keep files (default: nothing)."""
        return None

    def identity(self) -> dict[str, Any]:
        """Settings of this backend that change the signals it returns (fingerprinted with the run's config)."""
        return {"name": self.name}

    def model_fingerprint(self, base_model_id: str) -> str:
        """A string identifying the base model's weights as well as the backend can (default: the id itself)."""
        return base_model_id

    @abstractmethod
    def submit_finetune(
        self,
        base_model_id: str,
        training_records: Sequence[Record],
        hyperparameters: dict[str, Any],
        seed: int,
        *,
        tag: str | None = None,
    ) -> str:
        """Start fine-tuning `base_model_id` on `training_records` (in this order); returns the job id at once."""

    def find_job(self, tag: str) -> str | None:
        """The id of a job submitted earlier with `tag`, or None (default: the backend cannot tell)."""
        return None

    @abstractmethod
    def wait(self, job_id: str, *, timeout: float | None = None) -> str:
        """Block until job `job_id` succeeds; returns the fine-tuned model id. Raises `JobFailedError` naming the job
        when it failed or was cancelled, `JobTimeoutError` when `timeout` seconds (or the backend's own) pass."""

    @abstractmethod
    def response_signals(self, model_id: str, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        """`{signal: [N] float32}` for `self.signals`: `loss` is the mean NLL (nats) over each record's response
        tokens under model `model_id`, `margin` the mean log-odds of the correct response token."""

    def response_token_logprobs(self, model_id: str, records: Sequence[Record]) -> list[TokenLogprobs]:
        """Each record's response-token log-probabilities and their characters (see the module docstring);
        default: refused in one line (the backend gives no per-token log-probabilities)."""
        raise BackendError(f"the {self.name} backend gives no per-token log-probabilities of a response (with the "
                           "characters of each token), which a query span needs")

    def response_logprobs(self, model_id: str, records: Sequence[Record]) -> torch.Tensor:
        """`[N]` float32: mean NLL (nats) over each record's response tokens (the protocol's minimal call)."""
        return self.response_signals(model_id, records)["loss"]

    def count_tokens(self, base_model_id: str, records: Sequence[Record]) -> tuple[list[int], bool]:
        """(tokens per record `[N]`, exact?) for the cost estimate; default: characters / 4 of the chat's text."""
        return [estimate_tokens(r) for r in records], False


# ---------------------------------------------------------------------- helpers shared by backends


def estimate_tokens(record: Record) -> int:
    """Rough token count of a record's chat (all messages' text, CHARS_PER_TOKEN characters per token)."""
    chars = sum(len(m["content"]) for m in record.chat())
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def token_signals(logprobs: Sequence[float] | torch.Tensor) -> dict[str, torch.Tensor]:
    """`{"loss": [R], "margin": [R]}` float32: each token's NLL and log-odds log p − log(1 − p) from its log-prob.

    Same arithmetic as `llm_attr.losses` (float32, log p clamped to ≤ −1e−6 for the margin), so a backend that
    returns the log-probs of the local model reproduces the local per-token signals.
    """
    logp = torch.as_tensor(logprobs if isinstance(logprobs, torch.Tensor) else list(logprobs), dtype=torch.float32)
    clamped = logp.clamp(max=-1e-6)
    return {"loss": -logp, "margin": clamped - torch.log(-torch.expm1(clamped))}


def signals_from_token_logprobs(token_logprobs: Sequence[Sequence[float] | torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{"loss": [N], "margin": [N]}` float32 from each record's response-token log-probabilities (nats): the
    means of `token_signals` (a span's signal when given the span's tokens only)."""
    losses, margins = [], []
    for i, values in enumerate(token_logprobs):
        if len(values) == 0:
            raise BackendError(f"record {i}: no response-token log-probabilities to average")
        per_token = token_signals(values)
        losses.append(per_token["loss"].sum() / len(values))
        margins.append(per_token["margin"].sum() / len(values))
    return {"loss": torch.stack(losses), "margin": torch.stack(margins)}


def chat_jsonl(records: Sequence[Record]) -> str:
    """The chat fine-tuning JSONL format: one `{"messages": [{"role", "content"}, ...]}` line per record."""
    return "".join(json.dumps({"messages": r.chat()}, ensure_ascii=False) + "\n" for r in records)


def records_from_chat_jsonl(text: str, id_prefix: str = "line") -> list[Record]:
    """Parse chat fine-tuning JSONL back into records (ids `{id_prefix}-{line}`); `BackendError` on a bad line."""
    from ..data.records import record_from_dict

    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            records.append(record_from_dict({"id": f"{id_prefix}-{lineno}", "messages": obj["messages"]},
                                            f"training file line {lineno}"))
        except (json.JSONDecodeError, KeyError, TypeError, LlmAttrError) as e:
            raise BackendError(f"training file line {lineno}: not a chat fine-tuning record ({e})") from None
    return records
