"""Shared by the real-model study recipes (recipes/real_*.py): stages that re-use what a killed run finished.

Every stage writes its result last (a `wall.json` or a result file), so a re-run skips what is done. Stages before
the methods run on rank 0; under `accelerate launch` the other ranks wait for its files.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other work, spinning threads
# made a SmolLM2 forward 25x slower (docs/benchmarks.md); set before torch is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llm_attr.config import load_config, parse_overrides  # noqa: E402

GRADIENT_METHODS = ("grad-dot", "grad-cos", "tracin", "if-fisher", "if-kfac", "if-ekfac")


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for(files: list[Path], timeout: float = 7200) -> None:
    """Other ranks wait for rank 0's files (the stages before the methods run on rank 0 only)."""
    t0 = time.time()
    while not all(f.exists() for f in files):
        if time.time() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {files}")
        time.sleep(2)


def build_target(model: str, work: Path, train: Path, defaults: dict, overrides: list[str]) -> Path:
    """Fine-tune WORK/target (rank 0) with `defaults` + `--target-set` overrides; wall time in target_wall.json."""
    from llm_attr.finetune import FinetuneConfig, finetune

    out = work / "target"
    if (work / "target_wall.json").exists() and (out / "manifest.json").is_file():
        return out  # built by an earlier run of this recipe (possibly under an older config schema)
    if is_main():
        cfg = load_config(FinetuneConfig, None, {**defaults, **parse_overrides(overrides)})
        t0 = time.time()
        finetune(model, train, out, cfg)
        timing = work / "target_wall.json"
        if not timing.exists():
            timing.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    wait_for([work / "target_wall.json"])
    return out


def run_method(name: str, target: Path, train: Path, query: Path, work: Path, daunce_set: list[str],
               max_length: int = 128) -> Path:
    """Run one method into WORK/<name> (resumable); its wall time (this process's, when it finished) kept.

    `name`: a gradient method (`grad-cos`, `if-ekfac`, ...; `-R` sets the projection rank, e.g. `if-ekfac-16`),
    `daunce[-VARIANT]` (configs/daunce.yaml + `daunce_set`), `daunce-blackbox[-VARIANT]`, or `random`.
    """
    out = work / name
    wall = out / "wall.json"
    if wall.exists() or name == "random":
        return out
    t0 = time.time()
    base, _, rank = name.rpartition("-")
    if name in GRADIENT_METHODS or (base in GRADIENT_METHODS and rank.isdigit()):
        from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig

        method, extra = (base, {"projection_rank": int(rank)}) if rank.isdigit() and base else (name, {})
        cfg = GradientConfig(method=method, max_length=max_length, **extra)
        GradientAttribution(cfg).run(str(target), train, query, out)
    elif name.startswith("daunce-blackbox"):
        from llm_attr.methods.blackbox import BlackBoxConfig, BlackBoxDaunce

        cfg = load_config(BlackBoxConfig, ROOT / "configs" / "blackbox.yaml", parse_overrides(daunce_set))
        BlackBoxDaunce(cfg).run(str(target), train, query, out, yes=True)
    elif name.startswith("daunce"):
        from llm_attr.methods.daunce import Daunce, DaunceConfig

        cfg = load_config(DaunceConfig, ROOT / "configs" / "daunce.yaml", parse_overrides(daunce_set))
        Daunce(cfg).run(str(target), train, query, out)
    else:
        raise SystemExit(f"unknown method {name!r}")
    if is_main():
        wall.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    return out


def load_scores(run: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(scores [Q, N] float32, query ids, train ids) of a scored run directory."""
    from safetensors.numpy import load_file

    ids = json.loads((run / "ids.json").read_text())
    return load_file(str(run / "scores.safetensors"))["scores"], ids["query"], ids["train"]


def method_scores(name: str, run: Path, query_ids: list[str], n_train: int, seed: int) -> tuple[np.ndarray, float]:
    """(scores [Q, N] aligned to `query_ids`, wall seconds); `random` draws uniform scores from `seed`."""
    if name == "random":
        return np.random.default_rng(seed).random((len(query_ids), n_train)), 0.0
    scores, ids, _ = load_scores(run)
    rows = [ids.index(q) for q in query_ids]
    return scores[rows], json.loads((run / "wall.json").read_text())["seconds"]


def perturbation_rows(run: Path) -> list[dict]:
    """The loss-matrix rows of a Daunce (or black-box) run directory, one dict of tensors per perturbation, in order."""
    from safetensors.torch import load_file

    return [load_file(str(f)) for f in sorted((run / "shards").glob("perturbation-*.safetensors"))]


def theta0_train_loss(target: Path, train: Path, max_length: int, cache: Path | None = None) -> float:
    """Mean training loss (mean token NLL over response tokens) under the target θ₀; kept in `cache` if given."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())["loss"]
    from llm_attr.data.records import load_records
    from llm_attr.data.tokenize import pad_id_of, tokenize_records
    from llm_attr.losses import evaluate_signal
    from llm_attr.models.loading import load_model

    loaded = load_model(str(target))
    examples, _ = tokenize_records(load_records(train), loaded.tokenizer, max_length)
    loss = float(evaluate_signal(loaded.model, examples, pad_id_of(loaded.tokenizer)).mean())
    if cache is not None:
        cache.write_text(json.dumps({"loss": loss}))
    return loss


def parse_variant(text: str) -> tuple[str, dict]:
    """`"name:key=value,key=[a,b]"` -> `("name", overrides)` (commas inside brackets belong to a list value)."""
    name, _, sets = text.partition(":")
    return name, parse_overrides([s for s in re.split(r",(?![^\[]*\])", sets) if s]) if sets else {}
