"""Query measurements: which response tokens a query's signal is measured on, the whole response or a span of it.

`query_span` (every method's config key, `--query-span` on the command line) chooses the span of each query:

    response        the whole response (the default, the signal every method had before spans)
    metadata        the record's `metadata.span`: `[start, end]` character offsets into its response text
    task            the task's own extractor: MATH (metadata.task: math) the content of the last `\\boxed{}`;
                    a backdoor query (metadata.triggered) the target's first sentence ("ACCESS DENIED.")
    re:PATTERN      the first match of a regular expression over the response text (a PATTERN that is none of
                    the words above may omit the `re:`, e.g. `--query-span 'boxed\\{.*?\\}'`)

Characters map to response tokens by the tokenizer's offset mapping of the response text (or, when the tokens in
context differ from the text's own, a chat template's, by decoding prefixes of the response tokens): a token is
in the span when its characters overlap the span's; a token without characters (EOS, end of turn) never is. A
query whose span is empty stops the run with one line naming the file, the record and the field; there is no
silent fall-back to the whole response.

A span measurement is the package's one loss with the query's labels kept on the span's tokens only
(`masked_examples`): the mean NLL (or margin) over the span, so training, Daunce rows, gradients and further
training measure it alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .records import Record
from .tokenize import IGNORE_INDEX, Example

RESPONSE = "response"
KEYWORDS = ("response", "metadata", "task")
#: The help text of every config's `query_span` field.
HELP = ("the query measurement: response (whole response) | metadata (metadata.span [start, end] characters) | "
        "task (MATH: the \\boxed{} answer; backdoor: the target phrase) | re:PATTERN (first regex match)")


def check_span(spec: str) -> str:
    """`spec` validated (a regular expression that compiles); `ConfigError` in one line otherwise."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"query_span must be a non-empty string ({HELP}), got {spec!r}")
    if spec not in KEYWORDS:
        try:
            re.compile(_pattern(spec))
        except re.error as e:
            raise ConfigError(f"query_span {spec!r}: not a valid regular expression ({e})") from None
    return spec


def is_whole(spec: str | None) -> bool:
    """Whether `spec` measures the whole response."""
    return spec in (None, RESPONSE)


def span_tag(spec: str | None) -> str:
    """The suffix a measurement adds to a scoring's tag: '' (whole response), `-span-task`, `-span-<hash>`."""
    if is_whole(spec):
        return ""
    if spec in KEYWORDS:
        return f"-span-{spec}"
    import hashlib

    return "-span-" + hashlib.sha256(spec.encode()).hexdigest()[:8]


def _pattern(spec: str) -> str:
    return spec[3:] if spec.startswith("re:") else spec


def _task_span(record: Record, text: str) -> tuple[int, int] | None:
    meta = record.metadata or {}
    if meta.get("triggered") is True or meta.get("poisoned") is True:  # a backdoor record: its target phrase
        from .backdoor import DEFAULT_TARGET

        target = str(meta.get("target") or DEFAULT_TARGET)
        phrase = re.split(r"(?<=[.!?])\s", target.strip(), maxsplit=1)[0]
        start = text.lower().find(phrase.lower())
        return None if start < 0 else (start, start + len(phrase))
    if meta.get("task") == "math" or "\\boxed" in text:
        from .math_task import boxed_span

        return boxed_span(text)
    return None


def char_span(record: Record, spec: str, source: str = "query", row: int = 0) -> tuple[int, int]:
    """`(start, end)` character offsets of `record`'s span in its response text; `DataError` when none."""
    text = record.response_text()
    where = f"{source}: record {row + 1} (id {record.id!r})"
    if is_whole(spec):
        return 0, len(text)
    if spec == "metadata":
        span = (record.metadata or {}).get("span")
        if (not isinstance(span, (list, tuple)) or len(span) != 2 or not all(isinstance(v, int) for v in span)
                or not 0 <= span[0] < span[1] <= len(text)):
            raise DataError(f"{where}: field 'metadata.span' must be [start, end] character offsets with "
                            f"0 <= start < end <= {len(text)} (the response's length), got {span!r}")
        return int(span[0]), int(span[1])
    if spec == "task":
        found = _task_span(record, text)
        if found is None:
            raise DataError(f"{where}: field 'response' has no span for --query-span task (a MATH record needs a "
                            "\\boxed{} answer, a backdoor query metadata.triggered and the target phrase)")
        return found
    m = re.search(_pattern(spec), text)
    if m is None or m.end() == m.start():
        raise DataError(f"{where}: field 'response' has no match for --query-span {spec!r}")
    return m.start(), m.end()


def split_span(record: Record, spec: str | None) -> tuple[str, str, str]:
    """(text before, the span, text after) of `record`'s response (the whole response as the span for
    `response`, or when the record has no span), for marking it in tables and reports."""
    text = record.response_text()
    try:
        start, end = char_span(record, spec or RESPONSE)
    except DataError:
        return "", text, ""
    return text[:start], text[start:end], text[end:]


def marked_queries(path, spec: str | None) -> list[str] | None:
    """`id: response` of each query in the JSONL `path`, the span in **bold** (for `topk.md`); None for the whole
    response or without the file."""
    from .records import load_records

    if is_whole(spec) or path is None:
        return None
    out = []
    for record in load_records(path):
        before, inside, after = split_span(record, spec)
        out.append(f"{record.id}: {before}**{inside}**{after}".replace("\n", " "))
    return out


def response_ids(example: Example) -> list[int]:
    """The ids of `example`'s labelled (response) tokens, in order."""
    return [t for t in example.labels if t != IGNORE_INDEX]


def token_chars(text: str, ids: Sequence[int], tokenizer) -> np.ndarray:
    """`[R, 2]` int32: the characters `[start, end)` of `text` each response token of `ids` covers (`(n, n)` for
    a token with none: EOS, end of turn, a token past the text)."""
    n = len(text)
    out = np.full((len(ids), 2), n, dtype=np.int32)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        own = list(enc["input_ids"])
        if own == list(ids[: len(own)]):
            out[: len(own)] = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)
            return out
    # the tokens in context differ from the text's own (a chat template): decode prefixes
    full = tokenizer.decode(list(ids), skip_special_tokens=False)
    base = full.find(text)
    if base < 0:
        raise DataError(f"cannot map the response text {text[:40]!r}... onto its tokens (the decoded response "
                        f"{full[:40]!r}... does not contain it)")
    previous = 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False))
        lo, hi = min(max(previous - base, 0), n), min(max(end - base, 0), n)
        out[i] = (lo, hi) if hi > lo else (n, n)
        previous = end
    return out


def span_mask(chars: np.ndarray, start: int, end: int) -> np.ndarray:
    """`[R]` bool: the tokens whose characters overlap `[start, end)`."""
    return (chars[:, 0] < end) & (chars[:, 1] > start) & (chars[:, 1] > chars[:, 0])


def query_token_chars(records: Sequence[Record], examples: Sequence[Example], tokenizer) -> list[np.ndarray]:
    """Each query's `token_chars` (its response text against its labelled tokens)."""
    return [token_chars(r.response_text(), response_ids(e), tokenizer)
            for r, e in zip(records, examples, strict=True)]


def span_masks(records: Sequence[Record], chars: Sequence[np.ndarray], spec: str,
               source: str = "query") -> list[np.ndarray]:
    """Each query's `[R_q]` bool mask of its span's response tokens; the whole response (all tokens) for
    `response`. `DataError` naming the query when a span covers no token (e.g. truncated by max_length)."""
    out = []
    for row, (record, c) in enumerate(zip(records, chars, strict=True)):
        if is_whole(spec):
            out.append(np.ones(len(c), dtype=bool))
            continue
        start, end = char_span(record, spec, source, row)
        mask = span_mask(c, start, end)
        if not mask.any():
            raise DataError(f"{source}: record {row + 1} (id {record.id!r}): field 'response': the span "
                            f"[{start}, {end}) of --query-span {spec!r} covers no response token (truncated by "
                            "max_length?)")
        out.append(mask)
    return out


def masked_examples(examples: Sequence[Example], masks: Sequence[np.ndarray]) -> list[Example]:
    """`examples` with labels kept on the masked response tokens only (the loss of a span measurement)."""
    out = []
    for e, mask in zip(examples, masks, strict=True):
        labels = np.asarray(e.labels)
        pos = np.flatnonzero(labels != IGNORE_INDEX)
        if len(pos) != len(mask):
            raise ValueError(f"example {e.id!r}: {len(mask)} mask values for {len(pos)} response tokens")
        labels[pos[~mask]] = IGNORE_INDEX
        out.append(Example(e.index, e.id, e.input_ids, labels))
    return out


def span_examples(records: Sequence[Record], examples: Sequence[Example], tokenizer, spec: str | None,
                  source: str = "query") -> Sequence[Example]:
    """The query examples of measurement `spec`: `examples` themselves for the whole response, else their span
    (`masked_examples`); the featurize methods call this on their query examples."""
    if is_whole(spec):
        return examples
    check_span(spec)
    chars = query_token_chars(records, examples, tokenizer)
    return masked_examples(examples, span_masks(records, chars, spec, source))
