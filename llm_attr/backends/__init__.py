"""Black-box backends: where fine-tuning jobs run and response log-probabilities come from.

`local` (this machine, the project's own training loop: the reference) and `openai` (the official client against
OpenAI or an OpenAI-compatible service; optional extra `llm_attr[openai]`). Subclass `Backend` for your own.
"""

from .base import Backend, BackendError, CostNotConfirmed, JobFailedError, JobTimeoutError
from .local import LocalBackend, LocalBackendArgs
from .openai_api import OpenAIBackend, OpenAIBackendArgs  # imports `openai` only when a backend is made

__all__ = [
    "Backend",
    "BackendError",
    "CostNotConfirmed",
    "JobFailedError",
    "JobTimeoutError",
    "LocalBackend",
    "LocalBackendArgs",
    "OpenAIBackend",
    "OpenAIBackendArgs",
]

