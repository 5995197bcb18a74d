"""Speed options that must not change what is computed beyond their documented effect: bf16 autocast (fp32
weights and losses; close to fp32), batches grouped by length (a permutation, less padding, resumable), and the
θ₀ cache of lm_head inputs (the softmax rows it recomputes equal the full softmax)."""

from __future__ import annotations

import random

import pytest
import torch

from llm_attr.data.backdoor import make_backdoor_task
from llm_attr.data.records import as_records
from llm_attr.data.tokenize import pad_id_of, tokenize_records
from llm_attr.losses import autocast, evaluate_signal, native_bf16
from llm_attr.models.loading import load_model
from llm_attr.training import EpochShuffle, TrainingArgs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("builtin:tiny")
    train, _, _ = make_backdoor_task(n_train=40, n_query=0, fraction=0.1, seed=2)
    examples, _ = tokenize_records(as_records(train), loaded.tokenizer, 128)
    return loaded, examples, pad_id_of(loaded.tokenizer)


def test_bf16_autocast_signals_are_fp32_and_close_to_fp32(tiny):
    loaded, examples, pad = tiny
    full = evaluate_signal(loaded.model, examples, pad, signal=("loss", "margin"))
    half = evaluate_signal(loaded.model, examples, pad, signal=("loss", "margin"), precision="bf16")
    for s in ("loss", "margin"):
        assert half[s].dtype == torch.float32
        assert not torch.equal(half[s], full[s])  # bf16 matmuls really ran
        torch.testing.assert_close(half[s], full[s], rtol=0.05, atol=0.05)
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(half["loss"]), rank(full["loss"])]))[0, 1]
    assert spearman > 0.98


def test_precision_auto_and_validation():
    assert autocast("fp32", "cpu").fast_dtype == torch.bfloat16 and not autocast("fp32", "cpu")._enabled
    assert autocast("bf16", "cpu")._enabled
    assert autocast("auto", "cpu")._enabled == native_bf16("cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainingArgs(precision="fp8")


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    lengths = [random.Random(i).randint(5, 120) for i in range(203)]
    grouped = EpochShuffle(203, 7, lengths, batch_size=8)
    plain = EpochShuffle(203, 7)

    def padded(order):
        return sum(max(lengths[i] for i in order[b : b + 8]) * len(order[b : b + 8]) for b in range(0, 203, 8))

    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        plain.set_epoch(epoch)
        order = list(grouped)
        assert sorted(order) == list(range(203)) and order == list(grouped)  # a permutation, the same each time
        assert padded(order) < 0.8 * padded(list(plain))
    grouped.set_epoch(0)
    first = list(grouped)
    grouped.set_epoch(1)
    assert list(grouped) != first  # a new order every epoch


def test_training_with_grouped_batches_resumes_bit_identically(tiny, tmp_path):
    """A killed grouped run resumes to the weights of an uninterrupted one (the order is a function of seed, epoch)."""
    from llm_attr.models.lora import LoraArgs, attach_lora
    from llm_attr.training import Checkpointing, train

    loaded, examples, pad = tiny

    class Killed(Exception):
        pass

    def run(folder, kill_at=None):
        torch.manual_seed(0)  # the same LoRA initialisation in every run
        model = attach_lora(load_model("builtin:tiny").model, LoraArgs(rank=2, alpha=4.0))
        args = TrainingArgs(max_steps=8, batch_size=8, group_by_length=True, learning_rate=1e-2, seed=3)

        def on_step(step):
            if step == kill_at:
                raise Killed

        try:
            train(model, examples, args, pad, checkpoint=Checkpointing(folder, 2, "fp"), show_progress=False,
                  on_step=on_step)
        except Killed:
            return None
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = run(tmp_path / "a")
    assert run(tmp_path / "b", kill_at=5) is None  # killed after step 5: the checkpoint of step 4 stays
    resumed = run(tmp_path / "b")
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n], rtol=0, atol=0)
