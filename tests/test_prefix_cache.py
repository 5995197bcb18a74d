"""Frozen-prefix cache: with LoRA on the top layers only, the cached forward equals the full one (values and LoRA
gradients, any batch composition and padding), a batch it has not seen runs the whole model, and a Daunce run with
the cache gives the shards of a run without it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from llm_attr.data.backdoor import make_backdoor_task
from llm_attr.data.records import as_records
from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
from llm_attr.losses import forward_logits, per_example_loss
from llm_attr.methods.daunce import Daunce, DaunceConfig, shard_name
from llm_attr.models.loading import load_model
from llm_attr.models.lora import LoraArgs, attach_lora
from llm_attr.models.prefix_cache import first_trainable_layer, prefix_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def top_lora():
    """builtin:tiny with a rank-4 LoRA on its last layer (B randomised so gradients reach A), and 24 examples."""
    loaded = load_model("builtin:tiny")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    model = attach_lora(loaded.model, LoraArgs(rank=4, alpha=8.0, layers=1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    train, _, _ = make_backdoor_task(n_train=24, n_query=0, fraction=0.0, seed=3)
    examples, _ = tokenize_records(as_records(train), loaded.tokenizer, 128)
    return model, examples, pad_id_of(loaded.tokenizer)


def _loss_and_grads(model, batch):
    logits = forward_logits(model, batch)
    loss = per_example_loss(logits, batch["labels"])
    grads = torch.autograd.grad(loss.sum(), [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads


def test_cached_forward_and_lora_gradients_equal_the_full_model(top_lora):
    model, examples, pad = top_lora
    n_layers = model.config.num_hidden_layers
    assert first_trainable_layer(model) == n_layers - 1
    batches = [collate(examples[i : i + 5], pad) for i in (0, 7, 19)]  # other groupings than the cache's
    batches.append(collate(examples[3:9], pad, padding_side="left"))
    reference = [_loss_and_grads(model, b) for b in batches]
    with prefix_cache(model, examples, pad, batch_size=8) as cache:
        assert cache is not None and cache.start == n_layers - 1
        got = [_loss_and_grads(model, b) for b in batches]
        assert cache.hits == len(batches) and cache.misses == 0  # the agreement check uses a cache of its own
        # a batch with an unseen example runs the whole model, with the same result as outside the cache
        unseen = collate([examples[0], type(examples[0])(99, "new", [5, 6, 7, 8, 9], [-100, -100, 7, 8, 9])], pad)
        miss = _loss_and_grads(model, unseen)
        assert cache.misses == 1
    for (loss_a, grads_a), (loss_b, grads_b) in zip(reference, got, strict=True):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    outside = _loss_and_grads(model, unseen)
    torch.testing.assert_close(miss[0], outside[0])
    assert len(model.get_base_model().model.layers) == n_layers  # the layer list is restored


def test_off_when_every_layer_trains():
    loaded = load_model("builtin:tiny")
    model = attach_lora(loaded.model, LoraArgs(rank=2, alpha=4.0))
    assert first_trainable_layer(model) == 0
    train, _, _ = make_backdoor_task(n_train=4, n_query=0, fraction=0.0, seed=0)
    examples, _ = tokenize_records(as_records(train), loaded.tokenizer, 64)
    with prefix_cache(model, examples, pad_id_of(loaded.tokenizer)) as cache:
        assert cache is None


def test_daunce_with_top_layer_adapter_equals_a_run_without_the_cache(tmp_path, monkeypatch):
    train, triggered, _ = make_backdoor_task(n_train=32, n_query=3, fraction=0.125, seed=1)
    cfg = DaunceConfig(perturbations=2, max_steps=3, batch_size=8, max_length=128,
                       lora=LoraArgs(rank=4, alpha=8.0, layers=1))
    Daunce(cfg).run("builtin:tiny", train, triggered, tmp_path / "cached")

    @contextlib.contextmanager
    def no_cache(*_args, **_kwargs):
        yield None

    monkeypatch.setattr("llm_attr.methods.daunce.prefix_cache", no_cache)
    Daunce(cfg).run("builtin:tiny", train, triggered, tmp_path / "full")
    for k in range(2):
        a = load_file(str(tmp_path / "cached" / "shards" / f"{shard_name(k)}.safetensors"))
        b = load_file(str(tmp_path / "full" / "shards" / f"{shard_name(k)}.safetensors"))
        for key in ("train_loss", "train_margin", "query_loss", "query_margin"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_finetune_and_retrain_with_top_layer_lora_equal_runs_without_the_cache(tmp_path, monkeypatch):
    """The target's fine-tune and the LDS / removal retrains use the cache too (lora.layers): same adapter, same
    query losses as without it."""
    from llm_attr.evaluation.retrain import Retrainer
    from llm_attr.finetune import FinetuneConfig, finetune

    train, triggered, _ = make_backdoor_task(n_train=32, n_query=3, fraction=0.125, seed=1)
    cfg = FinetuneConfig(max_steps=3, batch_size=8, max_length=128, save_steps=0,
                         lora=LoraArgs(rank=4, alpha=8.0, layers=1))
    results = {}
    for name in ("cached", "full"):
        if name == "full":
            @contextlib.contextmanager
            def no_cache(*_args, **_kwargs):
                yield None

            monkeypatch.setattr("llm_attr.finetune.prefix_cache", no_cache)
            monkeypatch.setattr("llm_attr.evaluation.retrain.prefix_cache", no_cache)
        run = finetune("builtin:tiny", train, tmp_path / name, cfg)
        retrainer = Retrainer(str(run), as_records(train), "base", None, None)
        assert (retrainer.cache is not None) == (name == "cached")
        retrainer.fit(list(range(20)), seed=5)
        results[name] = (load_file(str(run / "adapter" / "adapter_model.safetensors")),
                         retrainer.losses(as_records(triggered)))
        retrainer.close()
    for key, value in results["cached"][0].items():
        torch.testing.assert_close(value, results["full"][0][key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results["cached"][1], results["full"][1], rtol=1e-4, atol=1e-5)


def test_generation_under_an_active_cache_equals_generation_without_it(top_lora):
    """Removal studies generate while a retrainer's cache is active: a KV-cache step (one new token, the whole
    attention mask) is never looked up as an example, and the text is the one the full model writes."""
    from llm_attr.generation import generate_responses

    model, examples, pad = top_lora
    loaded = load_model("builtin:tiny")
    _, triggered, _ = make_backdoor_task(n_train=0, n_query=3, fraction=0.0, seed=4)
    plain = generate_responses(model, loaded.tokenizer, as_records(triggered), max_new_tokens=8)
    with prefix_cache(model, examples, pad, batch_size=8) as cache:
        assert cache is not None
        cached = generate_responses(model, loaded.tokenizer, as_records(triggered), max_new_tokens=8)
    assert cached == plain


def test_local_backend_with_top_layer_adapter_equals_a_run_without_the_cache(tmp_path):
    """Black-box Daunce on the local backend computes the frozen bottom once for all its jobs, training and
    scoring: the same loss-matrix rows as with the cache off, and the cache is hit."""
    from llm_attr.backends.local import LocalBackend
    from llm_attr.methods.blackbox import BlackBoxConfig, BlackBoxDaunce

    train, triggered, _ = make_backdoor_task(n_train=32, n_query=3, fraction=0.125, seed=1)
    shards = {}
    for name, mb in (("cached", 2048.0), ("full", 0.0)):
        cfg = BlackBoxConfig(perturbations=2, batch_size=8)
        cfg.local.lora = LoraArgs(rank=4, alpha=8.0, layers=1)
        cfg.local.max_length, cfg.local.max_steps, cfg.local.prefix_cache_mb = 128, 3, mb
        backend = LocalBackend(cfg.local)
        run = BlackBoxDaunce(cfg, backend).run("builtin:tiny", train, triggered, tmp_path / name, yes=True)
        shards[name] = [load_file(str(run / "shards" / f"{shard_name(k)}.safetensors")) for k in range(2)]
        if mb:
            assert backend._prefix is not None and backend._prefix.hits > 0 and backend._prefix.misses == 0
        else:
            assert backend._prefix is None
    for a, b in zip(shards["cached"], shards["full"], strict=True):
        for key in ("train_loss", "train_margin", "query_loss", "query_margin"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
