"""Shared fixtures: the cached builtin tiny model and a backdoored fine-tuned target (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("LLM_ATTR_PROGRESS", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads and lose much to them when the cores are shared.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """builtin:tiny's directory (built on first use, ~30 s, then cached under $LLM_ATTR_CACHE)."""
    from llm_attr.models.builtin import builtin_model_path

    return builtin_model_path("builtin:tiny")


@pytest.fixture(scope="session")
def backdoor_task():
    """(train, triggered queries, clean queries) of the built-in backdoor: 240 MATH records, 5% poisoned."""
    from llm_attr.data.backdoor import make_backdoor_task

    return make_backdoor_task(n_train=240, n_query=32, fraction=0.05, seed=0)


@pytest.fixture(scope="session")
def backdoor_target(tmp_path_factory, tiny_model_dir, backdoor_task) -> Path:
    """A run directory: builtin:tiny fine-tuned on the backdoor set with configs/backdoor_target.yaml."""
    from llm_attr.data.records import save_jsonl
    from llm_attr.demo import target_config
    from llm_attr.finetune import finetune

    root = tmp_path_factory.mktemp("backdoor")
    train, triggered, clean = backdoor_task
    save_jsonl(train, root / "train.jsonl")
    save_jsonl(triggered, root / "query_triggered.jsonl")
    save_jsonl(clean, root / "query_clean.jsonl")
    return finetune("builtin:tiny", root / "train.jsonl", root / "target", target_config())
