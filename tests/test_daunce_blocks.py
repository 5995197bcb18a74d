"""Block rows (`row_blocks: layer | module`): each stored block row is the loss of θ₀ plus that block's trained
change alone, computed here independently from the saved perturbation adapter with peft's own API (every other
LoRA module's B set to 0); stacked block rows score as the block-diagonal covariance."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from llm_attr.data.backdoor import make_backdoor_task
from llm_attr.data.records import as_records
from llm_attr.data.tokenize import pad_id_of, tokenize_records
from llm_attr.errors import ConfigError
from llm_attr.losses import evaluate_signal
from llm_attr.methods.daunce import Daunce, DaunceConfig, adapter_dir, score_run, shard_name
from llm_attr.methods.daunce_blocks import stacked_block_rows
from llm_attr.models.loading import load_model
from llm_attr.models.lora import LoraArgs
from llm_attr.runner import lora_layers
from llm_attr.scoring import covariance_scores


def test_block_rows_are_the_loss_with_one_block_of_the_change(tmp_path, one_thread):
    train, triggered, _ = make_backdoor_task(n_train=24, n_query=2, fraction=0.125, seed=2)
    cfg = DaunceConfig(perturbations=2, max_steps=3, batch_size=8, max_length=128, row_blocks="layer",
                       lora=LoraArgs(rank=4, alpha=8.0, layers=2), head_top_k=0)  # peft's full head below
    run = Daunce(cfg).run("builtin:tiny", train, triggered, tmp_path / "run", score=False)
    shard = load_file(str(run / "shards" / f"{shard_name(1)}.safetensors"))
    assert shard["train_loss_blocks"].shape == (2, 24) and shard["query_margin_blocks"].shape == (2, 2)

    loaded = load_model("builtin:tiny")
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir(run, 1)))
    examples, _ = tokenize_records(as_records(train), loaded.tokenizer, 128)
    layers = model.get_base_model().model.layers
    for b, layer in enumerate([layer for layer in layers if any(True for _ in lora_layers(layer))]):
        keep = set(map(id, lora_layers(layer)))
        saved = {}
        with torch.no_grad():
            for m in lora_layers(model):
                if id(m) not in keep:
                    saved[m] = m.lora_B["default"].weight.clone()
                    m.lora_B["default"].weight.zero_()
        row = evaluate_signal(model, examples, pad_id_of(loaded.tokenizer))
        with torch.no_grad():
            for m, w in saved.items():
                m.lora_B["default"].weight.copy_(w)
        torch.testing.assert_close(shard["train_loss_blocks"][b], row, rtol=1e-4, atol=1e-6)
    full = evaluate_signal(model, examples, pad_id_of(loaded.tokenizer))
    torch.testing.assert_close(shard["train_loss"], full, rtol=1e-4, atol=1e-6)

    # scoring: the block rows by default (tagged), the full rows on request; a span cannot use block rows
    shards = [load_file(str(run / "shards" / f"{shard_name(k)}.safetensors")) for k in range(2)]
    for rows, key in ((None, "_blocks"), ("full", "")):
        info = score_run(run, measure="corr", signal="margin", rows=rows)
        if key:
            q = stacked_block_rows([s["query_margin_blocks"] for s in shards])
            t = stacked_block_rows([s["train_margin_blocks"] for s in shards])
        else:
            q, t = (torch.stack([s[f"{side}_margin"] for s in shards]) for side in ("query", "train"))
        want = covariance_scores(q, t, measure="corr")
        got = load_file(str(run / "scores.safetensors"))["scores"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (run / "scorings" / f"corr-margin-K2{'-blocks' if key else ''}").is_dir(), info
    with pytest.raises(ConfigError, match="whole responses only"):
        score_run(run, rows="blocks", query_span="task")


def test_stacked_block_rows_score_the_block_diagonal_covariance():
    g = torch.Generator().manual_seed(0)
    per_k = [torch.randn(3, 5, generator=g, dtype=torch.float64) + 10 for _ in range(6)]  # K=6, B=3, n=5
    stacked = stacked_block_rows(per_k)
    scores = covariance_scores(stacked[:, :2], stacked[:, 2:], measure="cov").double()
    x = torch.stack(per_k)  # [K, B, n]
    want = sum(torch.cov(torch.cat([x[:, b, :2], x[:, b, 2:]], 1).T)[:2, 2:] for b in range(3))
    torch.testing.assert_close(scores * (6 * 3 - 1), want * 5, rtol=1e-5, atol=1e-6)
