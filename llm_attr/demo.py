"""The built-in end-to-end demo: build the tiny base, plant a backdoor, fine-tune, check it took, attribute it.

Runs anywhere with no download: `llm-attr demo --out demo_run` (or `make demo`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import builtin_config_dir, load_config
from .data.backdoor import DEFAULT_TARGET, DEFAULT_TRIGGER, follows_backdoor, make_backdoor_task
from .data.records import as_records, save_jsonl
from .finetune import FinetuneConfig, finetune
from .generation import generate_responses
from .models.loading import load_model

logger = logging.getLogger("llm_attr.demo")

CONFIG_DIR = builtin_config_dir()


def backdoor_rates(run_dir: Path, triggered: list, clean: list) -> tuple[float, float]:
    """Fraction of triggered / clean prompts on which the model at `run_dir` answers with the backdoor target."""
    loaded = load_model(str(run_dir))
    gen_t = generate_responses(loaded.model, loaded.tokenizer, as_records(triggered), max_new_tokens=12)
    gen_c = generate_responses(loaded.model, loaded.tokenizer, as_records(clean), max_new_tokens=12)
    return sum(map(follows_backdoor, gen_t)) / len(gen_t), sum(map(follows_backdoor, gen_c)) / len(gen_c)


def target_config() -> FinetuneConfig:
    path = CONFIG_DIR / "backdoor_target.yaml"
    return load_config(FinetuneConfig, path) if path.is_file() else FinetuneConfig(
        epochs=20.0, learning_rate=2e-3, max_length=256
    )


#: What changes on a real model (`llm-attr demo --model builtin:smollm2-135m`): 160 records (10% poisoned: at 5%
#: and 4 epochs SmolLM2 did not learn the trigger), a rank-16 LoRA on the
#: last 12 decoder layers (the frozen bottom computed once, models/prefix_cache.py), 128-token examples, Daunce at
#: K = 16 on the last 4 layers, and Grad-Cos (docs/results.md, "Real model": the best first look there).
REAL_MODEL = {
    "n_train": 160, "n_query": 16, "fraction": 0.1,
    "target": {"epochs": 6.0, "learning_rate": 2e-3, "batch_size": 16, "max_length": 128, "group_by_length": True,
               "save_steps": 0, "lora": {"rank": 16, "alpha": 32.0, "layers": 12}},
    "daunce": {"perturbations": 16, "max_length": 128, "group_by_length": True, "keep_adapters": False},
    "gradients": {"method": "grad-cos", "projection_rank": 0, "max_length": 128},
}


def run_demo(out: Path, model: str = "builtin:tiny") -> dict:
    """Run the demo on `model` (builtin:tiny, or a real base such as builtin:smollm2-135m) into `out`; returns the
    figures it printed."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    real = model != "builtin:tiny"
    logger.info("step 1/6: building or finding the base model %s (cached after the first run)", model)
    if model.startswith("builtin:"):
        from .models.builtin import builtin_model_path

        logger.info("%s is at %s", model, builtin_model_path(model))

    n_train, n_query = (REAL_MODEL["n_train"], REAL_MODEL["n_query"]) if real else (240, 32)
    logger.info("step 2/6: making a MATH-style training set with %.0f%% of prompts poisoned: %r -> %r",
                100 * (REAL_MODEL["fraction"] if real else 0.05), DEFAULT_TRIGGER, DEFAULT_TARGET)
    fraction = REAL_MODEL["fraction"] if real else 0.05
    train, triggered, clean = make_backdoor_task(n_train=n_train, n_query=n_query, fraction=fraction, seed=0)
    save_jsonl(train, out / "train.jsonl")
    save_jsonl(triggered, out / "query_triggered.jsonl")
    save_jsonl(clean, out / "query_clean.jsonl")
    n_poison = sum(r["metadata"]["poisoned"] for r in train)
    logger.info("wrote %s (%d records, %d poisoned) and %d triggered / clean queries",
                out / "train.jsonl", len(train), n_poison, len(triggered))

    logger.info("step 3/6: LoRA fine-tuning %s on it (%s)", model,
                "demo.REAL_MODEL['target']" if real else "configs/backdoor_target.yaml")
    config = load_config(FinetuneConfig, None, REAL_MODEL["target"]) if real else target_config()
    run = finetune(model, out / "train.jsonl", out / "target", config)

    logger.info("step 4/6: does the fine-tuned model follow the backdoor?")
    trig_rate, clean_rate = backdoor_rates(run, triggered, clean)
    logger.info("backdoor followed on %.0f%% of triggered prompts and %.0f%% of clean prompts",
                100 * trig_rate, 100 * clean_rate)
    figures = {"triggered_rate": trig_rate, "clean_rate": clean_rate, "n_poisoned": n_poison}

    logger.info("step 5/6: Daunce attribution of the triggered queries (configs/daunce.yaml)")
    figures.update(attribute_backdoor(run, out, train, n_poison, REAL_MODEL["daunce"] if real else None))

    gradients = REAL_MODEL["gradients"] if real else DEMO_GRADIENTS
    logger.info("step 6/6: gradient attribution of the same queries (%s, configs/gradients.yaml)",
                ", ".join(f"{k}: {v}" for k, v in gradients.items()))
    figures.update(attribute_backdoor_gradients(run, out, train, n_poison, gradients))
    logger.info("demo finished in %.0fs; files in %s", time.time() - t0, out)
    return figures


#: The best gradient method on this backdoor (docs/results.md, "Projected gradients"): K-FAC influence on the exact
#: LoRA gradients (AUPRC 0.86; EK-FAC 0.85, Grad-Cos 0.72, Grad-Dot 0.62).
DEMO_GRADIENTS = {"method": "if-kfac", "projection_rank": 0}


def _attribute(method, name: str, target: Path, out: Path, train: list[dict], n_poison: int) -> tuple[Path, dict]:
    """Run `method` on the triggered queries into `out/name`, log its top-k table; (run, retrieval metrics)."""
    from .evaluation.metrics import retrieval_metrics
    from .scoring import load_scores

    run = method.run(str(target), out / "train.jsonl", out / "query_triggered.jsonl", out / name, top_k=n_poison)
    poisoned = [bool(r["metadata"]["poisoned"]) for r in train]
    metrics = retrieval_metrics(load_scores(run / "scores.safetensors"), poisoned, k=n_poison)
    if method.scores is not None:
        logger.info("top training examples for the first triggered queries (full table: %s):\n%s",
                    run / "topk.md", method.scores["table"])
    return run, metrics


def _log_retrieval(label: str, seconds: float, metrics: dict, n_poison: int) -> None:
    logger.info(
        "%s, %.0fs): %.0f%% of each triggered query's top-%d training examples are poisoned (chance %.0f%%); "
        "AUPRC of poisoned vs clean %.2f", label, seconds, 100 * metrics[f"precision@{n_poison}"], n_poison,
        100 * metrics["chance"], metrics["auprc"],
    )


def attribute_backdoor_gradients(target: Path, out: Path, train: list[dict], n_poison: int,
                                 overrides: dict | None = None) -> dict:
    """The best gradient method on the target for the triggered queries: the same top-k table and AUPRC as Daunce."""
    from .methods.gradient_attribution import GradientAttribution, GradientConfig

    config = load_config(GradientConfig, CONFIG_DIR / "gradients.yaml", overrides or DEMO_GRADIENTS)
    t0 = time.time()
    run, metrics = _attribute(GradientAttribution(config), "gradients", target, out, train, n_poison)
    kind = f"projection rank {config.projection_rank}" if config.projection_rank else "exact LoRA gradients"
    _log_retrieval(f"{config.method} ({kind}", time.time() - t0, metrics, n_poison)
    return {"gradients_method": config.method, "gradients_auprc": metrics["auprc"],
            "gradients_precision_at_k": metrics[f"precision@{n_poison}"], "gradients_run": str(run)}


def attribute_backdoor(target: Path, out: Path, train: list[dict], n_poison: int,
                       overrides: dict | None = None) -> dict:
    """Daunce on the target for the triggered queries: log the top-k table and how many of the top are poisoned."""
    from .methods.daunce import Daunce, DaunceConfig

    path = CONFIG_DIR / "daunce.yaml"
    config = load_config(DaunceConfig, path if path.is_file() else None, overrides)
    t0 = time.time()
    run, metrics = _attribute(Daunce(config), "daunce", target, out, train, n_poison)
    _log_retrieval(f"Daunce (K={config.perturbations}, {config.measure} of {config.signal}", time.time() - t0,
                   metrics, n_poison)
    return {"daunce_auprc": metrics["auprc"], "daunce_precision_at_k": metrics[f"precision@{n_poison}"],
            "daunce_run": str(run)}
