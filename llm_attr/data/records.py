"""Records: the unit of attribution. Loaded from JSONL, a saved `datasets` dataset, or a hub dataset.

A record is `{"id", "prompt", "response", "metadata"}` or `{"id", "messages", "metadata"}` where `messages` is a chat
(`[{"role": "user"|"system"|"assistant", "content": str}, ...]`) whose last message is the assistant's response.
Data as users have it maps onto that: `columns` renames fields (`--columns prompt=question,response=answer`), `chat`
reads other chat conventions (`--chat role=from,content=value,user=human,assistant=gpt`), TRL's `completion` is the
response, and TRL's conversational prompt-completion (`prompt` and `completion` both lists of messages) is a chat.
Rows of a `datasets` dataset without an id column get `NAME:ROW` ids, NAME the folder (or dataset) name and split, so
a training set and a query set never share an id by accident.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..io import atomic_write


@dataclass(slots=True)
class Record:
    """One training or query example. `response` is what the per-example loss is computed over."""

    id: str
    prompt: str | None = None
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def chat(self) -> list[dict[str, str]]:
        """The example as a chat whose last message is the assistant response."""
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt or ""}, {"role": "assistant", "content": self.response or ""}]

    def prompt_text(self) -> str:
        if self.messages is not None:
            return "\n".join(m["content"] for m in self.messages[:-1])
        return self.prompt or ""

    def response_text(self) -> str:
        if self.messages is not None:
            return self.messages[-1]["content"]
        return self.response or ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = self.messages
        else:
            out["prompt"] = self.prompt
            out["response"] = self.response
        out["metadata"] = self.metadata
        return out


def record_from_dict(obj: Any, where: str) -> Record:
    """Validate one raw record. `where` names the file and line, e.g. `train.jsonl:12`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise DataError(f"{where}: missing field 'id'")
    rid = obj["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise DataError(f"{where}: field 'id' must be a non-empty string or integer, got {rid!r}")
    rid = str(rid)
    metadata = obj.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise DataError(f"{where} (id {rid!r}): field 'metadata' must be an object")
    if "messages" in obj and obj["messages"] is not None:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where} (id {rid!r}): field 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where} (id {rid!r}): field 'messages[{i}]' needs string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where} (id {rid!r}): field 'messages' must end with an assistant message")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where} (id {rid!r}): field 'messages[-1].content' (the response) is empty")
        return Record(id=rid, messages=[{"role": m["role"], "content": m["content"]} for m in msgs], metadata=metadata)
    for key in ("prompt", "response"):
        if key not in obj:
            raise DataError(f"{where} (id {rid!r}): missing field '{key}' (or give 'messages')")
        if not isinstance(obj[key], str):
            raise DataError(f"{where} (id {rid!r}): field '{key}' must be a string, got {type(obj[key]).__name__}")
    if not obj["prompt"].strip():
        raise DataError(f"{where} (id {rid!r}): field 'prompt' is empty")
    if not obj["response"].strip():
        raise DataError(f"{where} (id {rid!r}): field 'response' is empty")
    return Record(id=rid, prompt=obj["prompt"], response=obj["response"], metadata=metadata)


def _check_unique(records: list[Record], source: str) -> None:
    _check_unique_ids([r.id for r in records], source)


def _check_unique_ids(ids: list[str], source: str) -> None:
    seen: dict[str, int] = {}
    for i, rid in enumerate(ids):
        if rid in seen:
            raise DataError(f"{source}: record {i + 1}: duplicate id {rid!r} (first at record {seen[rid] + 1})")
        seen[rid] = i


#: `--chat` keys that name message fields; every other key maps one of our roles to the data's role name.
CHAT_FIELDS = ("role", "content")
ROLES = ("system", "user", "assistant")
_mapping = contextvars.ContextVar("llm_attr_data_mapping", default=(None, None))


@contextlib.contextmanager
def data_mapping(columns: Mapping[str, str] | None = None, chat: Mapping[str, str] | None = None) -> Iterator[None]:
    """Within the block, every `load_records` (and so every command and method reading records) uses these
    `columns` and `chat` mappings unless given its own: what the shared `--columns` / `--chat` flags do."""
    check_mappings(columns, chat)
    token = _mapping.set((dict(columns) if columns else None, dict(chat) if chat else None))
    try:
        yield
    finally:
        _mapping.reset(token)


def check_mappings(columns: Mapping[str, str] | None, chat: Mapping[str, str] | None) -> None:
    """A `DataError` naming the key if `columns` maps a field we do not have or `chat` a key we do not read."""
    ours = ("id", "prompt", "response", "messages", "metadata")
    for key in columns or {}:
        if key not in ours:
            raise DataError(f"--columns {key}=...: unknown field {key!r}; fields are {', '.join(ours)}")
    for key in chat or {}:
        if key not in CHAT_FIELDS + ROLES:
            raise DataError(f"--chat {key}=...: unknown key {key!r}; keys are {', '.join(CHAT_FIELDS + ROLES)}")


def _chat_messages(msgs: Any, chat: Mapping[str, str] | None) -> Any:
    """A list of messages in the data's convention (`chat`: field and role names) as `{"role", "content"}` dicts."""
    if not chat or not isinstance(msgs, list):
        return msgs
    role_key, content_key = chat.get("role", "role"), chat.get("content", "content")
    roles = {theirs: ours for ours, theirs in chat.items() if ours in ROLES}
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            return msgs  # record_from_dict names the bad message
        if role_key not in m and "role" in m:  # already ours (a run directory's copy of the records)
            out.append(m)
            continue
        role = m.get(role_key)
        out.append({"role": roles.get(role, role), "content": m.get(content_key)})
    return out


def _rename(obj: dict[str, Any], columns: Mapping[str, str] | None, chat: Mapping[str, str] | None = None
            ) -> dict[str, Any]:
    """A raw row in our fields: `columns` renamed, TRL's `completion` as the response, chats in our convention."""
    out = dict(obj)
    for ours, theirs in (columns or {}).items():
        if theirs in out:
            out[ours] = out.pop(theirs)
    if "response" not in out and "completion" in out and "messages" not in out:
        out["response"] = out.pop("completion")
    for key in ("messages", "prompt", "response"):
        if isinstance(out.get(key), list):
            out[key] = _chat_messages(out[key], chat)
    if isinstance(out.get("prompt"), list) and isinstance(out.get("response"), list) and "messages" not in out:
        out["messages"] = out.pop("prompt") + out.pop("response")  # TRL's conversational prompt-completion
    return out


class LazyRecords(Sequence):
    """Records validated once, in one streaming pass, and then rebuilt from their source on access.

    What stays in memory is a row number (or a byte offset) per record and its id, not the records: about 0.2 KB
    per record where the records themselves took about 1 KB (MATH-style records; measured in docs/benchmarks.md).
    Indexing with a slice gives a list.
    """

    def __init__(self, source: str, n: int, ids: list[str], row: Callable[[int], Record],
                 rows: Callable[[], Iterator[Record]]) -> None:
        self.source, self._n, self.ids, self._row, self._rows = source, n, ids, row, rows

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"record {i} of {self._n}")
        return self._row(i)

    def __iter__(self) -> Iterator[Record]:
        return self._rows()

    def __repr__(self) -> str:
        return f"LazyRecords({self.source!r}, {self._n} records)"


def load_records(
    source: str | os.PathLike,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    chat: Mapping[str, str] | None = None,
) -> list[Record]:
    """Load records from a JSONL file (UTF-8, a leading BOM allowed), a `datasets.save_to_disk` directory, or a hub
    dataset name.

    `columns` maps our field names to the source's (`{"prompt": "question", "response": "answer"}`); `chat` reads
    chats of another convention (`{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}`); both
    default to the `data_mapping` block's. Rows of a dataset without an `id` get `NAME:ROW` (NAME: the folder or
    dataset name, with `/SPLIT` for a split of a `DatasetDict` or hub dataset). Raises `DataError` naming the file,
    line/row and field.
    """
    if columns is None and chat is None:
        columns, chat = _mapping.get()
    check_mappings(columns, chat)
    mapping = (columns, chat)
    source = os.fspath(source)
    path = Path(source)
    if path.is_file():
        return _load_jsonl(path, mapping)
    saved = path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())
    if saved:
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        name = path.resolve().name
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; available: {list(ds)}")
            ds, name = ds[split], f"{name}/{split}"
        return _from_rows(ds, str(path), mapping, name)
    if not path.is_dir() and (str(source).endswith((".jsonl", ".json")) or "/" not in str(source)):
        raise DataError(f"{source}: file not found")
    from datasets import load_dataset  # a hub dataset name, or a directory of data files

    try:
        ds = load_dataset(str(source), split=split)
    except Exception as e:  # hub unreachable, unknown dataset...
        raise DataError(f"{source}: could not load dataset ({type(e).__name__}: {e})") from None
    name = path.resolve().name if path.is_dir() else str(source).rstrip("/")
    return _from_rows(ds, str(source), mapping, f"{name}/{split}")


def default_id(name: str, row: int) -> str:
    """The id of row `row` of a dataset called `name` that has no id column: `NAME:ROW`."""
    return f"{name}:{row}"


def _dataset_row(row: Any, i: int, source: str, mapping: tuple, name: str) -> Record:
    row = _rename(dict(row), *mapping)
    if row.get("id") is None:
        row["id"] = default_id(name, i)
    extra = {k: v for k, v in row.items() if k not in {"id", "prompt", "response", "messages", "metadata"}}
    if extra:
        row = {k: v for k, v in row.items() if k not in extra}
        row["metadata"] = {**(row.get("metadata") or {}), **extra}
    return record_from_dict(row, f"{source}: row {i}")


def _from_rows(rows: Any, source: str, mapping: tuple, name: str) -> LazyRecords:
    """A `datasets.Dataset` (memory-mapped Arrow) as records: validated row by row, rebuilt on access."""
    ids = [_dataset_row(row, i, source, mapping, name).id for i, row in enumerate(rows)]
    _check_unique_ids(ids, source)
    return LazyRecords(source, len(ids), ids, lambda i: _dataset_row(rows[i], i, source, mapping, name),
                       lambda: (_dataset_row(row, i, source, mapping, name) for i, row in enumerate(rows)))


def _load_jsonl(path: Path, mapping: tuple) -> LazyRecords:
    """A JSONL file as records: one validating pass keeps each record's byte offset and line number; a record is
    parsed again when used. The file must not change while in use (checked: size and mtime)."""
    offsets, lines, ids = array("q"), array("q"), []
    with open(path, "rb") as f:
        stamp = os.fstat(f.fileno())
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM (Windows tools write one)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, dict):
                obj = _rename(obj, *mapping)
            ids.append(record_from_dict(obj, f"{path}:{lineno}").id)
            offsets.append(start)
            lines.append(lineno)
    if not ids:
        raise DataError(f"{path}: no records")
    _check_unique_ids(ids, str(path))
    starts, linenos = np.frombuffer(offsets, dtype=np.int64), np.frombuffer(lines, dtype=np.int64)
    signature = (stamp.st_size, stamp.st_mtime_ns)

    def parse(raw: bytes, lineno: int) -> Record:
        obj = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        return record_from_dict(_rename(obj, *mapping), f"{path}:{lineno}")

    def check(f) -> None:
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns) != signature:
            raise DataError(f"{path}: the file changed while in use; re-run the command")

    def row(i: int) -> Record:
        with open(path, "rb") as f:
            check(f)
            f.seek(int(starts[i]))
            return parse(f.readline(), int(linenos[i]))

    def rows() -> Iterator[Record]:
        with open(path, "rb") as f:
            check(f)
            wanted = iter(zip(starts.tolist(), linenos.tolist(), strict=True))
            nxt = next(wanted, None)
            offset = 0
            for raw in f:
                if nxt is not None and offset == nxt[0]:
                    yield parse(raw, nxt[1])
                    nxt = next(wanted, None)
                offset += len(raw)

    return LazyRecords(str(path), len(ids), ids, row, rows)


def as_records(data: Any) -> Sequence[Record]:
    """Accept a path (records loaded lazily: `LazyRecords`), loaded records, a list of `Record`, or a list of dicts
    (validated)."""
    if isinstance(data, (str, os.PathLike)):
        return load_records(data)
    if isinstance(data, LazyRecords):
        return data
    records = [r if isinstance(r, Record) else record_from_dict(r, f"record {i}") for i, r in enumerate(data)]
    if not records:
        raise DataError("no records given")
    _check_unique(records, "records")
    return records


def save_jsonl(records: Sequence[Record] | Sequence[dict], path: str | os.PathLike) -> None:
    """Write records as JSONL, atomically, one record at a time (nothing but the record being written in memory)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_dict() if isinstance(r, Record) else r, ensure_ascii=False))
                f.write("\n")

    atomic_write(path, write)


def records_fingerprint(records: Sequence[Record]) -> str:
    """`fingerprint([r.to_dict() for r in records])`, computed one record at a time."""
    h = hashlib.sha256(b"[")
    for i, r in enumerate(records):
        if i:
            h.update(b", ")
        h.update(json.dumps(r.to_dict(), sort_keys=True, default=str).encode())
    h.update(b"]")
    return h.hexdigest()[:16]
