"""Model loading (builtin, user directories, run directories), LoRA defaults, quantisation errors, the training loop."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_attr.data.math_task import make_math
from llm_attr.data.records import as_records
from llm_attr.data.tokenize import collate, tokenize_records
from llm_attr.errors import ModelError
from llm_attr.losses import forward_logits
from llm_attr.models.loading import load_model
from llm_attr.models.lora import LoraArgs, attach_lora, default_target_modules
from llm_attr.training import TrainingArgs, train


def _tiny_config(kind: str, vocab: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    if kind == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64)
    if kind == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "qwen2", "llama"])
def test_user_model_directory_loads_and_gets_architecture_lora_defaults(tmp_path, tiny_model_dir, kind):
    """Any save_pretrained causal LM + tokenizer works, with LoRA on that architecture's projections."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, len(tok)))
    model.save_pretrained(tmp_path / kind)
    tok.save_pretrained(tmp_path / kind)
    loaded = load_model(str(tmp_path / kind))
    assert loaded.model.config.model_type == kind
    peft_model = attach_lora(loaded.model, LoraArgs(rank=2))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    targets = default_target_modules(kind)
    assert names and all("lora_" in n for n in names)
    assert {t for t in targets if any(f".{t}." in n for n in names)} == set(targets)


def test_quantization_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same check on a GPU machine
    with pytest.raises(ModelError, match="4bit needs a CUDA GPU"):
        load_model("builtin:tiny", quantization="4bit")


def test_unknown_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown builtin"):
        load_model("builtin:nope")


def _examples(tok, n=16, seed=0):
    return tokenize_records(as_records(make_math(n, seed=seed)), tok)[0]


def test_gradient_accumulation_equals_the_large_batch(tiny_model_dir):
    """One step of batch 16 == one step of 2 x 8 accumulated (same data order, mean of per-example losses)."""
    base = load_model("builtin:tiny", device="cpu")
    examples = _examples(base.tokenizer)
    results = []
    for bs, accum in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = attach_lora(copy.deepcopy(base.model), LoraArgs(rank=4))
        args = TrainingArgs(max_steps=1, batch_size=bs, gradient_accumulation_steps=accum, learning_rate=1e-2,
                            warmup_ratio=0.0, max_grad_norm=0.0)
        train(model, examples, args, base.tokenizer.pad_token_id, show_progress=False)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    # Adam's first step is ~lr * sign(g): entries whose gradient is zero up to float noise may flip sign, so
    # compare all entries but allow that handful.
    a = torch.cat([results[0][n].flatten() for n in results[0]])
    b = torch.cat([results[1][n].flatten() for n in results[0]])
    close = (a - b).abs() <= 1e-6
    assert close.float().mean() > 0.999, close.float().mean()


def test_weights_and_subsets_change_exactly_what_they_should(tiny_model_dir):
    base = load_model("builtin:tiny", device="cpu")
    examples = _examples(base.tokenizer)
    pad = base.tokenizer.pad_token_id

    def trained(**kw):
        torch.manual_seed(0)
        model = attach_lora(copy.deepcopy(base.model), LoraArgs(rank=4))
        args = TrainingArgs(max_steps=3, batch_size=16, learning_rate=1e-2, warmup_ratio=0.0)
        result = train(model, examples, args, pad, show_progress=False, **kw)
        return model, result

    plain, r1 = trained()
    ones, r2 = trained(weights=torch.ones(len(examples)))
    assert r1.loss_history == r2.loss_history
    # weight 0 on examples 8..15 == training on examples 0..7 with a doubled learning signal: check direction only
    _, r3 = trained(weights=torch.cat([torch.ones(8), torch.zeros(8)]))
    _, r4 = trained(subset=list(range(8)))
    assert r3.loss_history[0] == pytest.approx(r4.loss_history[0] / 2, rel=1e-5)
    with pytest.raises(Exception, match="subset is empty"):
        trained(subset=[])


def test_run_directory_loads_as_merged_model_equal_to_the_adapter(tmp_path, tiny_model_dir):
    from llm_attr.finetune import FinetuneConfig, finetune

    records = make_math(32, seed=1)
    cfg = FinetuneConfig(max_steps=4, learning_rate=1e-2, batch_size=8, lora=LoraArgs(rank=4))
    run = finetune("builtin:tiny", records, tmp_path / "run", cfg)
    merged = load_model(str(run))
    stacked = load_model(str(run), merge_adapters=False)
    assert hasattr(stacked.model, "peft_config") and not hasattr(merged.model, "peft_config")
    batch = collate(tokenize_records(as_records(records[:4]), merged.tokenizer)[0], merged.tokenizer.pad_token_id)
    with torch.no_grad():
        a, b = forward_logits(merged.model, batch), forward_logits(stacked.model, batch)
        base = forward_logits(load_model("builtin:tiny").model, batch)
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, base, atol=1e-3)  # the adapter really changed the model
    # A run built on a run: the chain resolves back to builtin:tiny.
    run2 = finetune(str(run), records, tmp_path / "run2", cfg)
    assert load_model(str(run2)).model.config.model_type == "llama"
