"""Records: the unit of attribution. Loaded from JSONL, a saved `datasets` dataset, or a hub dataset.

A record is `{"id", "prompt", "response", "metadata"}` or `{"id", "messages", "metadata"}` where `messages` is a chat
(`[{"role": "user"|"system"|"assistant", "content": str}, ...]`) whose last message is the assistant's response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write_text, fingerprint


@dataclass
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
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.id in seen:
            raise DataError(f"{source}: record {i + 1}: duplicate id {r.id!r} (first at record {seen[r.id] + 1})")
        seen[r.id] = i


def _rename(obj: dict[str, Any], columns: dict[str, str] | None) -> dict[str, Any]:
    if not columns:
        return obj
    out = dict(obj)
    for ours, theirs in columns.items():
        if theirs in out:
            out[ours] = out.pop(theirs)
    return out


def load_records(
    source: str | Path,
    *,
    split: str = "train",
    columns: dict[str, str] | None = None,
) -> list[Record]:
    """Load records from a JSONL file, a `datasets.save_to_disk` directory, or a hub dataset name.

    `columns` maps our field names to the source's (`{"prompt": "question", "response": "answer"}`). Records without
    an `id` in a dataset get their row index. Raises `DataError` naming the file, line/row and field.
    """
    path = Path(source)
    if path.is_file():
        return _load_jsonl(path, columns)
    saved = path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())
    if saved:
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; available: {list(ds)}")
            ds = ds[split]
        return _from_rows(ds, str(path), columns)
    if not path.is_dir() and (str(source).endswith((".jsonl", ".json")) or "/" not in str(source)):
        raise DataError(f"{source}: file not found")
    from datasets import load_dataset  # a hub dataset name, or a directory of data files

    try:
        ds = load_dataset(str(source), split=split)
    except Exception as e:  # hub unreachable, unknown dataset...
        raise DataError(f"{source}: could not load dataset ({type(e).__name__}: {e})") from None
    return _from_rows(ds, str(source), columns)


def _from_rows(rows: Any, source: str, columns: dict[str, str] | None) -> list[Record]:
    records = []
    for i, row in enumerate(rows):
        row = _rename(dict(row), columns)
        row.setdefault("id", str(i))
        extra = {k: v for k, v in row.items() if k not in {"id", "prompt", "response", "messages", "metadata"}}
        if extra:
            row = {k: v for k, v in row.items() if k not in extra}
            row["metadata"] = {**(row.get("metadata") or {}), **extra}
        records.append(record_from_dict(row, f"{source}: row {i}"))
    _check_unique(records, source)
    return records


def _load_jsonl(path: Path, columns: dict[str, str] | None) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, dict):
                obj = _rename(obj, columns)
            records.append(record_from_dict(obj, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: no records")
    _check_unique(records, str(path))
    return records


def as_records(data: Any) -> list[Record]:
    """Accept a path, a list of `Record`, or a list of dicts (validated)."""
    if isinstance(data, (str, Path)):
        return load_records(data)
    records = [r if isinstance(r, Record) else record_from_dict(r, f"record {i}") for i, r in enumerate(data)]
    if not records:
        raise DataError("no records given")
    _check_unique(records, "records")
    return records


def save_jsonl(records: list[Record] | list[dict], path: str | Path) -> None:
    """Write records as JSONL, atomically."""
    lines = [json.dumps(r.to_dict() if isinstance(r, Record) else r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "\n".join(lines) + "\n")


def records_fingerprint(records: list[Record]) -> str:
    return fingerprint([r.to_dict() for r in records])
