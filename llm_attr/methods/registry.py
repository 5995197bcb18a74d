"""Which method owns a store, and how `llm-attr score` and `llm-attr query` reach it; the preconditioner names.

Each store kind (`manifest.json` field `method`) maps to one entry: the module that scores it and the options
it takes, or the reason it cannot be scored. The CLI dispatches through `method_for` and never compares method
strings itself. Importing this module imports no method (and no torch): the CLI builds its choices from it.

Adding a method: write `methods/<name>.py` with its config, its featurize class (work items, `compute`, through
`pipeline`) and `score_cli(run, top_k, **options)` / `query_cli(run, query, out, top_k, **options)`, then add
one `MethodEntry` here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LlmAttrError, RunDirError

#: The gradient scoring methods, i.e. preconditioners (`preconditioners.PRECONDITIONERS` holds their classes).
PRECONDITIONERS: dict[str, str] = {
    "grad-dot": "plain inner products of the gradients",
    "grad-cos": "cosine of the gradients",
    "tracin": "inner products summed over the stored checkpoints, weighted by their learning rates",
    "if-fisher": "influence functions, damped empirical Fisher",
    "if-kfac": "influence functions, K-FAC",
    "if-ekfac": "influence functions, eigenvalue-corrected K-FAC",
}
#: Preconditioners fitted on the K-FAC statistics stored with the training gradients.
FACTOR_PRECONDITIONERS: tuple[str, ...] = ("if-kfac", "if-ekfac")


@dataclass(frozen=True)
class MethodEntry:
    """How the CLI scores and queries one store kind.

    `score` / `query`: "module:function" (`(run, top_k, **options) -> info` / `(run, query, out, top_k,
    **options) -> info`, info holding `table` and `files`), or None with `refused` saying why. `score_options` /
    `query_options`: the CLI options that apply (others given are refused, by name).
    """

    kind: str
    command: str
    score: str | None = None
    query: str | None = None
    score_options: tuple[str, ...] = ()
    query_options: tuple[str, ...] = ()
    refused: str = ""

    def _function(self, spec: str) -> Callable[..., dict[str, Any]]:
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)

    def _options(self, given: dict[str, Any], allowed: tuple[str, ...], run: Any) -> dict[str, Any]:
        given = {k: v for k, v in given.items() if v not in (None, False)}
        wrong = [k for k in given if k not in allowed]
        if wrong:
            flags = ", ".join("--" + ("self" if k == "self_influence" else k.replace("_", "-")) for k in wrong)
            raise LlmAttrError(f"{run}: {flags} do not apply to a {self.kind} run")
        return given

    def run_score(self, run: Any, top_k: int, **options: Any) -> dict[str, Any]:
        if self.score is None:
            raise RunDirError(f"{run}: a {self.kind} store cannot be scored: {self.refused}")
        return self._function(self.score)(run, top_k=top_k, **self._options(options, self.score_options, run))

    def run_query(self, run: Any, query: Any, out: Any, top_k: int, **options: Any) -> dict[str, Any]:
        if self.query is None:
            raise RunDirError(f"{run}: `llm-attr query` does not apply to a {self.kind} store: {self.refused}")
        return self._function(self.query)(run, query, out, top_k=top_k,
                                          **self._options(options, self.query_options, run))


METHODS: dict[str, MethodEntry] = {
    "daunce": MethodEntry(
        "daunce", "llm-attr daunce", score="llm_attr.methods.daunce_store:score_cli",
        query="llm_attr.methods.daunce_store:query_cli",
        score_options=("measure", "signal", "perturbations", "self_influence", "query_span", "per_token", "query_id",
                       "rows"),
        query_options=("measure", "signal", "perturbations", "query_span")),
    "gradients": MethodEntry(
        "gradients", "llm-attr gradients", score="llm_attr.methods.gradient_store:score_cli",
        query="llm_attr.methods.gradient_attribution:query_cli",
        score_options=("method", "damping", "query_span", "per_token"),
        query_options=("method", "damping", "query_span", "per_token")),
    "further-training": MethodEntry(
        "further-training", "llm-attr further-train", score="llm_attr.methods.further_training:score_cli",
        refused="its scores are the further-training reference itself, for one set of queries; new queries need "
                "new runs (`llm-attr further-train`)"),
    "retrain": MethodEntry(
        "retrain", "llm-attr retrain",
        refused="it is an LDS ground truth (query losses of retrains), not attribution scores; evaluate scored "
                "runs against it with `llm-attr eval lds --ground-truth RUN`"),
}


def method_for(kind: str | None, where: Any = "the run") -> MethodEntry:
    """The entry of store kind `kind` (a manifest's `method`); `RunDirError` naming the kinds known."""
    if kind not in METHODS:
        raise RunDirError(f"{where}: holds a store of kind {kind!r}, which this version does not know "
                          f"(known: {', '.join(METHODS)})")
    return METHODS[kind]
