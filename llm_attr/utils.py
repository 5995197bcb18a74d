"""Small shared helpers: progress bars that respect the environment, logging set-up, seeding."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from tqdm.auto import tqdm


def progress_enabled() -> bool:
    """Progress bars are on unless LLM_ATTR_PROGRESS=0 or TQDM_DISABLE=1 (CI, logs)."""
    return os.environ.get("LLM_ATTR_PROGRESS", "1") != "0" and os.environ.get("TQDM_DISABLE", "0") in ("0", "")


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    return tqdm(iterable, disable=disable or not progress_enabled(), leave=False, **kwargs)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "datasets", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not progress_enabled():
            hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
