"""Tokenisation with response masks, reported truncation, and padding that leaves every example's loss unchanged."""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError
from .records import LazyRecords, Record

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class Example:
    """A tokenised record: `input_ids`, and `labels` equal to them on response tokens and -100 elsewhere.

    Stored compactly (an integer array, and the response's start when the labels are a suffix of the ids, as
    `tokenize_records` makes them), so the examples of a 10⁶-record training set fit in memory; `input_ids` and
    `labels` are built as lists on access. Immutable; `Examples` holds a whole data set in one flat array.
    """

    __slots__ = ("index", "id", "_ids", "_labels")

    def __init__(self, index: int, id: str, input_ids, labels) -> None:
        self.index, self.id = index, id
        self._ids = np.asarray(input_ids, dtype=np.int32)
        self._set_labels(labels)

    @classmethod
    def view(cls, index: int, id: str, ids: np.ndarray, response_start: int) -> Example:
        """An example over `ids` (an integer array, not copied) whose labels are `ids[response_start:]`."""
        e = cls.__new__(cls)
        e.index, e.id, e._ids, e._labels = index, id, ids, response_start
        return e

    @property
    def input_ids(self) -> list[int]:
        return self._ids.tolist()

    @property
    def labels(self) -> list[int]:
        if isinstance(self._labels, int):
            return [IGNORE_INDEX] * self._labels + self._ids[self._labels :].tolist()
        return self._labels.tolist()

    def _set_labels(self, labels) -> None:
        """Examples are immutable (those of `Examples` are views made on access: a change would be lost)."""
        lab = np.asarray(labels, dtype=np.int32)
        if lab.shape != self._ids.shape:
            raise ValueError(f"example {self.id!r}: {lab.shape[0]} labels for {self._ids.shape[0]} tokens")
        labelled = np.flatnonzero(lab != IGNORE_INDEX)
        start = int(labelled[0]) if labelled.size else len(lab)
        suffix = (lab[:start] == IGNORE_INDEX).all() and (lab[start:] == self._ids[start:]).all()
        self._labels = start if suffix else lab

    @property
    def n_tokens(self) -> int:
        return int(self._ids.shape[0])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Example) and (self.index, self.id) == (other.index, other.id)
                and self.input_ids == other.input_ids and self.labels == other.labels)

    def __repr__(self) -> str:
        return f"Example(index={self.index}, id={self.id!r}, n_tokens={self.n_tokens})"


class Examples(Sequence):
    """The tokenised examples of a data set, in one flat token array (uint16 when the vocabulary allows, else int32:
    2 or 4 bytes a token, plus 16 an example and its id): `Example`s are views made on access. Indexing with a slice
    gives a list."""

    def __init__(self, ids: list[str], tokens: np.ndarray, offsets: np.ndarray, response_starts: np.ndarray) -> None:
        self.ids, self._tokens, self._offsets, self._starts = ids, tokens, offsets, response_starts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        return Example.view(i, self.ids[i], self._tokens[lo:hi], int(self._starts[i]))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __add__(self, other: Examples) -> Examples:
        """Both sets in one (indices follow positions in the result), e.g. training then query examples."""
        if not isinstance(other, Examples):
            return NotImplemented
        return Examples(self.ids + other.ids, np.concatenate([self._tokens, other._tokens]),
                        np.concatenate([self._offsets, other._offsets[1:] + self._offsets[-1]]),
                        np.concatenate([self._starts, other._starts]))

    @property
    def n_tokens(self) -> np.ndarray:
        """`[N]` int64: each example's length in tokens."""
        return np.diff(self._offsets)

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {len(self._tokens)} tokens)"


def token_lengths(examples: Sequence[Example]) -> list[int]:
    """Each example's length in tokens (from the flat offsets for `Examples`, without building the examples)."""
    if isinstance(examples, Examples):
        return examples.n_tokens.tolist()
    return [e.n_tokens for e in examples]


@dataclass
class TruncationReport:
    n_examples: int = 0
    n_truncated: int = 0
    prompt_tokens_lost: int = 0
    response_tokens_lost: int = 0
    truncated_ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.n_truncated}/{self.n_examples} examples truncated: {self.prompt_tokens_lost} prompt tokens and "
            f"{self.response_tokens_lost} response tokens lost"
        )


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def prompt_ids(record: Record, tokenizer) -> list[int]:
    """Token ids of everything before the response, ending where generation starts."""
    if getattr(tokenizer, "chat_template", None):
        return _apply_template(tokenizer, record.chat()[:-1], add_generation_prompt=True)
    text = record.prompt_text() + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _assistant_span(tokenizer, messages: list[dict]) -> tuple[list[int], int, int] | None:
    """(ids of the whole chat, start, stop) of the last assistant turn's tokens by the template's own
    `{% generation %}` mask (`return_assistant_tokens_mask`), or None when the template has no such mask."""
    if "generation" not in (tokenizer.chat_template or ""):
        return None
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out.get("assistant_masks") or [])
    if 1 not in mask:
        return None
    stop = len(mask) - mask[::-1].index(1)
    start = stop
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids, start, stop


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_record(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one record; the response ends with the end-of-turn / EOS token.

    With a chat template the tokens and the loss are TRL's `SFTTrainer`'s: a prompt/response record is TRL's
    conversational prompt-completion (the response: every token after the prompt rendered with the generation prompt,
    from where the two renderings diverge), a `messages` record is TRL's `messages` data with `assistant_only_loss`
    (the response: the last assistant turn as the template's `{% generation %}` mask marks it; later tokens, which no
    loss sees, are dropped). Without a template: the prompt, a newline, the response and EOS.
    """
    p_ids = prompt_ids(record, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        span = _assistant_span(tokenizer, record.chat()) if record.messages is not None else None
        if span is not None:
            full, start, stop = span
            return full[:start], full[start:stop]
        full = _apply_template(tokenizer, record.chat(), add_generation_prompt=False)
        start = _common_prefix(p_ids, full)  # TRL's rule when a template renders the prompt alone differently
        return full[:start], full[start:]
    else:
        r_ids = list(tokenizer(record.response_text(), add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            r_ids.append(tokenizer.eos_token_id)
    return p_ids, r_ids


def tokenize_records(
    records: Sequence[Record], tokenizer, max_length: int = 512, source: str = "records"
) -> tuple[Examples, TruncationReport]:
    """Tokenise records (one at a time: `records` may be lazy); over-long examples lose prompt tokens from the left
    first, then response tokens from the right.

    Raises `DataError` if truncation would leave an example with no response token.
    """
    # 2 bytes a token when every id fits (vocabularies up to 65,536: GPT-2, Llama 2, Mistral, SmolLM2), else 4
    small = len(tokenizer) <= 1 << 16
    tokens, offsets, starts, ids = array("H" if small else "i"), array("q", [0]), array("q"), []
    report = TruncationReport(n_examples=len(records))
    for i, rec in enumerate(records):
        p_ids, r_ids = encode_record(rec, tokenizer)
        if not r_ids:
            raise DataError(f"{source}: record {i + 1} (id {rec.id!r}): field 'response' has no tokens")
        excess = len(p_ids) + len(r_ids) - max_length
        if excess > 0:
            report.n_truncated += 1
            report.truncated_ids.append(rec.id)
            keep_prompt = max(len(p_ids) - excess, 1 if len(p_ids) else 0)
            report.prompt_tokens_lost += len(p_ids) - keep_prompt
            p_ids = p_ids[len(p_ids) - keep_prompt :]
            excess = len(p_ids) + len(r_ids) - max_length
            if excess > 0:
                if excess >= len(r_ids):
                    raise DataError(
                        f"{source}: record {i + 1} (id {rec.id!r}): field 'response' is removed entirely by "
                        f"truncation to max_length={max_length}"
                    )
                report.response_tokens_lost += excess
                r_ids = r_ids[: len(r_ids) - excess]
        tokens.extend(p_ids)
        tokens.extend(r_ids)
        offsets.append(len(tokens))
        starts.append(len(p_ids))
        ids.append(rec.id)
    if report.n_truncated:
        logger.warning("%s: %s (max_length=%d)", source, report, max_length)
    if isinstance(records, LazyRecords):
        ids = records.ids  # the same strings: not held twice
    examples = Examples(ids, np.frombuffer(tokens, dtype=np.uint16 if small else np.int32),
                        np.frombuffer(offsets, dtype=np.int64), np.frombuffer(starts, dtype=np.int64))
    return examples, report


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise DataError("tokenizer has neither a pad token nor an EOS token to pad with")


def collate(examples: list[Example], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch. Returns input_ids, attention_mask, labels, position_ids `[B, T]` and index `[B]`.

    Position ids count real tokens only, so an example's logits do not depend on its padding.
    """
    width = max(e.n_tokens for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        n_pad = width - e.n_tokens
        pad_ids, pad_mask, pad_lab = [pad_id] * n_pad, [0] * n_pad, [IGNORE_INDEX] * n_pad
        if padding_side == "left":
            ids.append(pad_ids + e.input_ids)
            mask.append(pad_mask + [1] * e.n_tokens)
            labels.append(pad_lab + e.labels)
        else:
            ids.append(e.input_ids + pad_ids)
            mask.append([1] * e.n_tokens + pad_mask)
            labels.append(e.labels + pad_lab)
    attention_mask = torch.tensor(mask, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": attention_mask,
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": position_ids,
        "index": torch.tensor([e.index for e in examples], dtype=torch.long),
    }
