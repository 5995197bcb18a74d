"""The per-example loss against a hand computation, and its invariance to batch size and padding side."""

from __future__ import annotations

import math

import torch

from llm_attr.data.math_task import make_math
from llm_attr.data.records import as_records
from llm_attr.data.tokenize import IGNORE_INDEX, collate, tokenize_records
from llm_attr.losses import evaluate_signal, forward_logits, per_example_loss, per_example_signal
from llm_attr.models.loading import load_model


def test_loss_matches_hand_computation_on_two_examples():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 4, 2]])
    got = per_example_loss(logits, labels)

    def nll(row, t, target):  # token t predicts labels[t + 1]
        z = logits[row, t]
        return -(z[target] - math.log(sum(math.exp(v) for v in z.tolist())))

    expected0 = (nll(0, 0, 3) + nll(0, 1, 1)) / 2  # response tokens 3 and 1, each predicted from the previous position
    expected1 = (nll(1, 1, 4) + nll(1, 2, 2)) / 2
    assert torch.allclose(got, torch.tensor([expected0, expected1]), atol=1e-5)

    margin = per_example_signal(logits, labels, "margin")
    p = torch.softmax(logits[0, 0], -1)[3].item()
    p2 = torch.softmax(logits[0, 1], -1)[1].item()
    m0 = (math.log(p / (1 - p)) + math.log(p2 / (1 - p2))) / 2
    assert abs(margin[0].item() - m0) < 1e-4


def test_loss_is_identical_whatever_the_batch_size_or_padding_side(tiny_model_dir):
    loaded = load_model("builtin:tiny", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    records = as_records(make_math(12, seed=3))
    examples, _ = tokenize_records(records, tok)
    assert len({len(e.input_ids) for e in examples}) > 1  # different lengths: padding really happens
    alone = torch.stack([per_example_loss(forward_logits(model, b), b["labels"])[0]
                         for b in (collate([e], tok.pad_token_id) for e in examples)])
    with torch.no_grad():
        for side in ("left", "right"):
            batch = collate(examples, tok.pad_token_id, padding_side=side)
            batched = per_example_loss(forward_logits(model, batch), batch["labels"])
            assert torch.allclose(batched, alone, atol=1e-5), side
    for bs in (1, 5, 12):
        assert torch.allclose(evaluate_signal(model, examples, tok.pad_token_id, batch_size=bs), alone, atol=1e-5)
    both = evaluate_signal(model, examples, tok.pad_token_id, batch_size=4, signal=("loss", "margin"))
    assert torch.allclose(both["loss"], alone, atol=1e-5) and both["margin"].shape == (12,)


def test_fast_evaluation_equals_the_plain_lora_forward(tiny_model_dir):
    """evaluate_signal's summed LoRA weights and response-only lm_head give the plain forward's values, on a Llama
    (Linear) and a GPT-2 (Conv1D, fan_in_fan_out), with several adapters active and nothing left patched."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from llm_attr.models.lora import LoraArgs, attach_lora, merged_lora_forward

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = tokenize_records(as_records(make_math(10, seed=5)), tok)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2))
    for base in (load_model("builtin:tiny", device="cpu").model, gpt2):
        torch.manual_seed(0)
        model = attach_lora(base, LoraArgs(rank=4, dropout=0.1))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # a trained-looking adapter: B != 0
        model.eval()
        with torch.no_grad():
            want = {s: torch.cat([per_example_signal(forward_logits(model, b), b["labels"], s)
                                  for b in (collate([e], tok.pad_token_id) for e in examples)])
                    for s in ("loss", "margin")}
        got = evaluate_signal(model, examples, tok.pad_token_id, batch_size=4, signal=("loss", "margin"))
        for s in want:
            assert torch.allclose(got[s], want[s], atol=1e-5), (type(base).__name__, s)
        with merged_lora_forward(model):
            assert sum("forward" in vars(m) for m in model.modules()) == (8 if base is gpt2 else 14)  # every LoRA layer
        assert not any("forward" in vars(m) for m in model.modules())  # the patch is gone
