"""Fault points: named places where a test can SIGKILL the process, to prove that a killed run loses nothing.

`fault_point("shard_write")` does nothing unless the environment asks for a fault:

    LLM_ATTR_FAULT=shard_write@3          kill this process at the 3rd time it reaches `shard_write`
    LLM_ATTR_FAULT=train_step@5:1         ... only in the process with accelerate rank 1
    LLM_ATTR_FAULT_COUNTS=/tmp/hits.json  on a clean exit, write how often each point was reached (rank 0)

The points (where a real run dies in practice):
    train_step        after an optimiser step (finetune, Daunce perturbations, retraining, further training)
    checkpoint_write  mid-way through writing a training checkpoint (temp file written, not yet renamed)
    shard_write       mid-way through writing a store shard (temp file written, not yet renamed: a torn write)
    shard_done        after a shard and its checksum sidecar are on disk (between shards)
    score_chunk       after one chunk of scores is written (the scores file is still a temp file)
    job_submitted     black-box Daunce: after a fine-tuning job was submitted and recorded, before waiting on it
"""

from __future__ import annotations

import atexit
import json
import os
import signal
from collections import Counter

from .io import process_rank

POINTS = ("train_step", "checkpoint_write", "shard_write", "shard_done", "score_chunk", "job_submitted")

_hits: Counter[str] = Counter()
_target: tuple[str, int, int | None] | None = None
_parsed = False


def _parse() -> None:
    global _target, _parsed
    _parsed = True
    spec = os.environ.get("LLM_ATTR_FAULT")
    if spec:
        point, _, rest = spec.partition("@")
        count, _, rank = rest.partition(":")
        if point not in POINTS or not count.isdigit():
            raise ValueError(f"LLM_ATTR_FAULT={spec!r}: expected POINT@N[:RANK] with POINT one of {POINTS}")
        _target = (point, int(count), int(rank) if rank else None)
    counts = os.environ.get("LLM_ATTR_FAULT_COUNTS")
    if counts and process_rank() == 0:
        atexit.register(lambda: _write_counts(counts))


def _write_counts(path: str) -> None:
    with open(path, "w") as f:
        json.dump(dict(_hits), f)


def fault_point(point: str) -> None:
    """Count a visit to `point`; SIGKILL this process if LLM_ATTR_FAULT names this visit."""
    if not _parsed:
        _parse()
    _hits[point] += 1
    if _target is not None and _target[0] == point and _hits[point] == _target[1]:
        if _target[2] is None or _target[2] == process_rank():
            os.kill(os.getpid(), signal.SIGKILL)
