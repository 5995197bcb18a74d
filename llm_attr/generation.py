"""Batched greedy generation of responses to records' prompts (left padding, chat template when present)."""

from __future__ import annotations

import torch

from .data.records import Record
from .data.tokenize import pad_id_of, prompt_ids
from .utils import progress


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    records: list[Record],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuation of each record's prompt; returns the decoded new text (special tokens removed)."""
    model.eval()
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    outputs: list[str] = []
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    for batch in progress(batches, desc=desc, disable=desc is None):
        ids = [prompt_ids(r, tokenizer) for r in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in gen[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs
