"""The loop every built-in task generator shares: `n` records drawn from one seeded RNG, ids `<task>-00000`..."""

from __future__ import annotations

import random
from collections.abc import Callable


def seeded_records(task: str, n: int, seed: int, draw: Callable[[random.Random, set[str]], dict]) -> list[dict]:
    """`n` records `{"id": f"{task}-{i:05d}", **draw(rng, seen)}` from `random.Random(seed)`; `seen` holds the
    prompts drawn so far (a draw avoids them while its space allows)."""
    if n < 0:
        raise ValueError(f"make_{task}: n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    for i in range(n):
        record = draw(rng, seen)
        seen.add(record["prompt"])
        records.append({"id": f"{task}-{i:05d}", **record})
    return records
