"""Small shared helpers: progress bars that respect the environment, logging set-up, seeding."""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

_quiet = False  # set by `setup_logging` to a level above INFO (`llm-attr -q`)


def progress_enabled() -> bool:
    """Progress bars are on unless LLM_ATTR_PROGRESS=0 or TQDM_DISABLE=1 (CI, logs) or logging is quieter than
    INFO (`-q`)."""
    if _quiet:
        return False
    return os.environ.get("LLM_ATTR_PROGRESS", "1") != "0" and os.environ.get("TQDM_DISABLE", "0") in ("0", "")


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where `tqdm.auto` draws its bars as widgets)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr is a TTY) or a notebook: bars then, log lines otherwise."""
    if in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """An inner progress bar (steps, batches): shown only on a terminal, never in a log file."""
    return tqdm(iterable, disable=disable or not progress_enabled() or not on_terminal(), leave=False, **kwargs)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Overall:
    """The one overall progress report of a long command: `unit k/K` with the elapsed time and an estimate.

    On a terminal, a bar that stays; otherwise (a log file, CI) an INFO line after the first item, then about
    every tenth of the items or every `interval` seconds, and after the last: a K = 32 run logs about a dozen
    lines. Silent with `-q` or LLM_ATTR_PROGRESS=0 (the lines only: the work is the same). `bar: False` when an
    inner bar already shows the same count on a terminal (a fine-tune's steps).
    """

    def __init__(self, total: int, unit: str, *, done: int = 0, interval: float = 60.0,
                 log: logging.Logger | None = None, bar: bool = True):
        self.total, self.unit, self.count, self.interval = total, unit, done, interval
        self.start_count, self.start = done, time.monotonic()
        self.last_count, self.last_time = done, self.start
        self.log = log or logging.getLogger("llm_attr.progress")
        self.enabled = progress_enabled() and total > 0
        self.bar = tqdm(total=total, initial=done, desc=unit, unit=unit.split()[-1], leave=True, dynamic_ncols=True,
                        disable=not (bar and self.enabled and on_terminal()))
        self.lines = self.enabled and not on_terminal()

    def eta(self) -> float | None:
        """Seconds left, from the items this run finished so far (None before the first)."""
        finished = self.count - self.start_count
        if finished <= 0:
            return None
        return (time.monotonic() - self.start) / finished * (self.total - self.count)

    def update(self, n: int = 1) -> None:
        self.count += n
        self.bar.update(n)
        if not self.lines:
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        if (self.count - self.last_count >= step or now - self.last_time >= self.interval
                or self.count >= self.total or self.last_count == self.start_count):
            eta = self.eta()
            left = f", about {_duration(eta)} left" if eta is not None and self.count < self.total else ""
            self.log.info("%s %d/%d done (%s elapsed%s)", self.unit, self.count, self.total,
                          _duration(now - self.start), left)
            self.last_count, self.last_time = self.count, now

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Overall:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def setup_logging(level: int = logging.INFO) -> None:
    global _quiet
    _quiet = level > logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "datasets", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not progress_enabled() or not on_terminal():
            hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
