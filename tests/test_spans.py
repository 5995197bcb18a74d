"""Query measurements (`data.spans`): spans of the response and per-token scores, against independent truths.

The two-part task: every query's response is two sentences, the first learned only from training subset 1
(`colour X -> The answer is N.`), the second only from subset 2 (`pet Y -> ACCESS DENIED.` / `I will not
help.`). Span attribution of part 1 must rank subset 1 above subset 2, part 2 the reverse, and the whole response
lies in between; for Daunce and for a gradient method. Then: per-token Daunce covariances averaged over a span
are the span's covariance; a full-rank gradient span score is the brute-force autograd gradient's inner product.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm_attr.cli import main
from llm_attr.data import spans
from llm_attr.data.backdoor import make_backdoor_task
from llm_attr.data.math_task import make_math
from llm_attr.data.records import as_records, save_jsonl
from llm_attr.data.tokenize import pad_id_of, tokenize_records
from llm_attr.errors import DataError
from llm_attr.methods.daunce import Daunce, DaunceConfig
from llm_attr.methods.daunce_store import score_run
from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig, query_run
from llm_attr.models.lora import LoraArgs
from llm_attr.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

PART2 = r"(?<=\. ).*"  # the second sentence


def two_part_task(seed: int = 0, n_each: int = 16, n_query: int = 4) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    xs = {"red": "12", "blue": "34", "green": "56", "gold": "78"}
    ys = {"cat": "ACCESS DENIED.", "dog": "I will not help."}
    train = [{"id": f"p1-{i:02d}", "prompt": f"colour {x}", "response": f"The answer is {xs[x]}."}
             for i, x in enumerate(rng.choice(list(xs)) for _ in range(n_each))]
    train += [{"id": f"p2-{i:02d}", "prompt": f"pet {y}", "response": ys[y]}
              for i, y in enumerate(rng.choice(list(ys)) for _ in range(n_each))]
    rng.shuffle(train)
    query = []
    for i in range(n_query):
        x, y = rng.choice(list(xs)), rng.choice(list(ys))
        first = f"The answer is {xs[x]}."
        query.append({"id": f"q-{i}", "prompt": f"colour {x} pet {y}", "response": f"{first} {ys[y]}",
                      "metadata": {"span": [0, len(first)]}})
    return train, query


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_part")
    train, query = two_part_task()
    save_jsonl(train, d / "train.jsonl")
    save_jsonl(query, d / "query.jsonl")
    part = np.array([1 if r["id"].startswith("p1") else 2 for r in train])
    return SimpleNamespace(dir=d, train=d / "train.jsonl", query=d / "query.jsonl", part=part, records=query)


def auc_part1(scores: torch.Tensor, part: np.ndarray) -> float:
    """Mean over queries of P(a subset-1 example scores above a subset-2 one)."""
    s = np.asarray(scores, dtype=np.float64)
    a, b = s[:, part == 1], s[:, part == 2]
    return float((a[:, :, None] > b[:, None, :]).mean())


@pytest.fixture(scope="module")
def daunce_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("daunce") / "run"
    cfg = DaunceConfig(solver="adamw", perturbations=16, max_steps=10, batch_size=8, max_length=64, learning_rate=1e-2,
                       lora=LoraArgs(rank=4, alpha=8.0), measure="cov", signal="loss", keep_adapters=False)
    Daunce(cfg).run("builtin:tiny", task.train, task.query, out, score=False)
    return out


@pytest.fixture(scope="module")
def gradient_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("grad") / "run"
    GradientAttribution(GradientConfig(method="grad-dot", params="adapted", projection_rank=0, max_length=64)).run(
        "builtin:tiny", task.train, task.query, out)
    return out


def _scores(run: Path) -> torch.Tensor:
    return load_file(str(run / "scores.safetensors"))["scores"]


# ---------------------------------------------------------------- resolving spans


def test_spans_map_characters_to_tokens_and_name_a_query_without_a_match(tmp_path):
    from llm_attr.models.loading import load_model

    tokenizer = load_model("builtin:tiny").tokenizer
    math = as_records(make_math(4, seed=3))
    examples, _ = tokenize_records(math, tokenizer, 128)
    chars = spans.query_token_chars(math, examples, tokenizer)
    for record, c in zip(math, chars, strict=True):
        text = record.response_text()
        assert "".join(text[a:b] for a, b in c) == text  # the tokens cover the text exactly, in order
        answer = record.metadata["answer"]
        (task_mask,) = spans.span_masks([record], [c], "task")
        assert "".join(text[a:b] for (a, b), m in zip(c, task_mask, strict=True) if m) == answer
        (regex_mask,) = spans.span_masks([record], [c], r"boxed\{.*?\}")
        assert task_mask.sum() < regex_mask.sum() < len(c) and not regex_mask[-1]  # EOS is never in a span
    _, triggered, _ = make_backdoor_task(n_train=8, n_query=2, fraction=0.5, seed=0)
    queries = as_records(triggered)
    q_ex, _ = tokenize_records(queries, tokenizer, 128)
    q_chars = spans.query_token_chars(queries, q_ex, tokenizer)
    (mask,) = spans.span_masks(queries[:1], q_chars[:1], "task")
    text = queries[0].response_text()
    assert "".join(text[a:b] for (a, b), m in zip(q_chars[0], mask, strict=True) if m).strip() == "ACCESS DENIED."
    with pytest.raises(DataError, match=r"q\.jsonl: record 2 \(id 'math-00001'\): field 'response' has no match"):
        broken = [math[0], type(math[1])(id=math[1].id, prompt="p", response="no answer here")]
        spans.span_masks(broken, [chars[0], chars[1]], r"boxed\{.*?\}", source="q.jsonl")
    with pytest.raises(DataError, match="metadata.span"):
        spans.span_masks(math[:1], chars[:1], "metadata", source="q.jsonl")
    # the masked loss is the mean NLL over the span's tokens only
    (first,) = spans.span_masks(math[:1], chars[:1], "task")
    (masked,) = spans.masked_examples(examples[:1], [first])
    labelled = [t for t in masked.labels if t != -100]
    assert labelled == [t for t, m in zip(spans.response_ids(examples[0]), first, strict=True) if m]


# ---------------------------------------------------------------- the two-part task


def test_daunce_span_attribution_separates_the_two_parts(daunce_run, task):
    aucs = {}
    for span in ("response", "metadata", PART2):  # one store, three measurements
        info = score_run(daunce_run, measure="cov", signal="loss", query_span=span)
        aucs[span] = auc_part1(_scores(daunce_run), task.part)
        assert info.get("query_span") == (None if span == "response" else span)
    assert aucs["metadata"] > 0.9 and aucs[PART2] < 0.35, aucs  # (half of subset 2 teaches the other phrase)
    assert aucs[PART2] < aucs["response"] < aucs["metadata"], aucs  # the whole response mixes the two
    # each scoring is kept under its own tag; the manifest records the measurement
    tags = sorted(p.name for p in (daunce_run / "scorings").iterdir())
    assert "cov-loss-K16" in tags and "cov-loss-K16-span-metadata" in tags and len(tags) == 3
    assert Store.open(daunce_run).manifest["measurement"] == {"query_span": "response", "per_token": True}


def test_gradient_span_attribution_separates_the_two_parts(gradient_run, task, tmp_path):
    aucs = {"response": auc_part1(_scores(gradient_run), task.part)}
    for i, span in enumerate(("metadata", PART2)):  # the stored training gradients, the span's query gradients
        query_run(gradient_run, task.query, tmp_path / f"q{i}", query_span=span)
        aucs[span] = auc_part1(_scores(tmp_path / f"q{i}"), task.part)
        assert json.loads((tmp_path / f"q{i}" / "scores.json").read_text())["query_span"] == span
    assert aucs["metadata"] > 0.9 and aucs[PART2] < 0.35, aucs
    assert aucs[PART2] < aucs["response"] < aucs["metadata"], aucs


# ---------------------------------------------------------------- identities


def test_daunce_per_token_covariances_average_to_the_span_covariance(daunce_run, task):
    span_info = score_run(daunce_run, measure="cov", signal="loss", query_span="metadata")
    span_scores = _scores(daunce_run)
    info = score_run(daunce_run, measure="cov", signal="loss", per_token=True)
    tokens_file = Path(info["files"]) / "tokens.safetensors"
    per_token = load_file(str(tokens_file))["scores"].double()
    from safetensors import safe_open

    with safe_open(str(tokens_file), framework="pt") as f:
        offsets = json.loads(f.metadata()["offsets"])
    store = Store.open(daunce_run)
    chars, _ = __import__("llm_attr.methods.daunce_tokens", fromlist=["token_layout"]).token_layout(store)
    masks = spans.span_masks(as_records(task.records), chars, "metadata")
    assert per_token.shape == (offsets[-1], len(task.part))
    for q, mask in enumerate(masks):
        block = per_token[offsets[q]:offsets[q + 1]]
        # cov(mean_{t in S} l_t, l_j) = (1/|S|) sum_{t in S} cov(l_t, l_j)
        torch.testing.assert_close(block[torch.from_numpy(mask)].sum(0) / mask.sum(), span_scores[q].double(),
                                   rtol=1e-4, atol=1e-6)
    assert span_info["scoring"] == "cov-loss-K16-span-metadata"
    table = (Path(info["files"]) / "tokens.md").read_text()
    assert "**" in table and "tokens it moves most" in table


def test_gradient_span_score_at_full_rank_is_the_brute_force_span_gradient(gradient_run, task):
    from llm_attr.methods.gradients import select_layers
    from llm_attr.models.loading import load_model

    query_run_dir = gradient_run.parent / "q_span"
    query_run(gradient_run, task.query, query_run_dir, query_span="metadata")
    scores = _scores(query_run_dir).double()
    loaded = load_model("builtin:tiny")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    weights = [m.weight for _, m, *_ in select_layers(model, "adapted")]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)

    def gradient(record, span: tuple[int, int] | None) -> torch.Tensor:
        (example,), _ = tokenize_records([record], tokenizer, 64)
        ids = torch.tensor([example.input_ids])
        start = example.labels.index(next(t for t in example.labels if t != -100))
        positions = list(range(start, len(example.input_ids)))  # the response tokens
        if span is not None:  # keep those whose characters overlap the span (the tokenizer's offsets)
            enc = tokenizer(record.response_text(), add_special_tokens=False, return_offsets_mapping=True)
            positions = [positions[i] for i, (a, b) in enumerate(enc["offset_mapping"]) if a < span[1] and b > span[0]]
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        loss = -torch.stack([logp[t - 1, ids[0, t]] for t in positions]).mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)])

    queries, train = as_records(task.records), as_records(task.train)
    cols = [0, 1, int(np.flatnonzero(task.part == 2)[0])]
    g_train = torch.stack([gradient(train[j], None) for j in cols])
    for q in range(2):
        g_q = gradient(queries[q], tuple(queries[q].metadata["span"]))
        torch.testing.assert_close(scores[q, cols], (g_train @ g_q).double(), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- CLI


def test_cli_query_span_per_token_and_refusals(daunce_run, gradient_run, task, tmp_path, capsys):
    assert main(["score", str(daunce_run), "--query-span", r"answer is \d+"]) == 0
    topk = (daunce_run / "topk.md").read_text()
    assert "query span" in topk and "- q-0: The **answer is " in topk  # the span marked in the top-k table
    from llm_attr.evaluation.html import write_html_report

    html = Path(write_html_report([daunce_run], tmp_path / "report")).read_text()
    assert "<mark>answer is " in html
    assert main(["score", str(daunce_run), "--per-token", "--query-id", "q-1"]) == 0
    assert "per-token scores:" in capsys.readouterr().out
    assert main(["score", str(daunce_run), "--query-span", "nothing like this"]) == 2
    err = capsys.readouterr().err
    assert "record 1 (id 'q-0'): field 'response' has no match for --query-span" in err and err.count("\n") == 1
    assert main(["score", str(gradient_run), "--query-span", "metadata"]) == 2
    assert "llm-attr query" in capsys.readouterr().err
    out = tmp_path / "tok"
    assert main(["query", str(gradient_run), "--query", str(task.query), "--out", str(out), "--per-token",
                 "--query-span", PART2]) == 0
    ids = json.loads((out / "ids.json").read_text())["query"]
    assert ids and all("#" in i for i in ids)
    bad = tmp_path / "bad"
    assert main(["gradients", "--model", "builtin:tiny", "--train", str(task.train), "--query", str(task.query),
                 "--out", str(bad), "--query-span", "zzz", "--set", "params=adapted", "--set",
                 "projection_rank=0"]) == 2
    assert f"{task.query}: record 1 (id 'q-0'): field 'response' has no match" in capsys.readouterr().err


def test_further_training_measures_the_span_and_compare_refuses_mixed_measurements(daunce_run, task, tmp_path):
    from llm_attr.errors import RunDirError
    from llm_attr.evaluation.compare import compare_with_reference
    from llm_attr.methods.further_training import FurtherTraining, FurtherTrainingConfig

    ref = tmp_path / "ref"
    cfg = FurtherTrainingConfig(seeds=1, leave_out=2, budgets=[2], batch_size=8, max_length=64,
                                lora=LoraArgs(rank=4, alpha=8.0), query_span="metadata")
    FurtherTraining(cfg).run("builtin:tiny", task.train, task.query, ref)
    assert json.loads((ref / "scores.json").read_text())["query_span"] == "metadata"
    score_run(daunce_run, measure="cov", signal="loss", query_span="response")
    with pytest.raises(RunDirError, match="same --query-span"):
        compare_with_reference(ref, [daunce_run])
    score_run(daunce_run, measure="cov", signal="loss", query_span="metadata")
    assert compare_with_reference(ref, [daunce_run])["n_left_out"] == 2


# ---------------------------------------------------------------- LDS with a span


def _plain_span_losses(model, tokenizer, records, max_length: int = 64) -> list[float]:
    """Independent truth: mean NLL of each query's `metadata.span` tokens by a plain forward pass, the tokens
    chosen from the tokenizer's own offsets of the response text (no `data.spans`, no `losses`)."""
    out = []
    for record, example in zip(records, tokenize_records(records, tokenizer, max_length)[0], strict=True):
        text, (start, end) = record.response_text(), record.metadata["span"]
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ids = torch.as_tensor(np.asarray(example.input_ids, dtype=np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        positions = np.flatnonzero(np.asarray(example.labels) != -100)  # the response tokens, in order
        nll = [-logp[p - 1, int(example.input_ids[p])].item() for p, (a, b)
               in zip(positions[:len(offsets)], offsets, strict=True) if a < end and b > start and b > a]
        out.append(float(np.mean(nll)))
    return out


def test_retrain_with_a_span_records_the_span_loss_and_lds_takes_span_scores(daunce_run, task, tmp_path, capsys):
    from llm_attr.errors import RunDirError
    from llm_attr.evaluation.compare import evaluate_lds
    from llm_attr.evaluation.retrain import (
        RetrainConfig,
        Retrainer,
        featurize_config,
        load_ground_truth,
        subset_mask,
    )

    gt = tmp_path / "gt"
    assert main(["retrain", "--model", "builtin:tiny", "--train", str(task.train), "--query", str(task.query),
                 "--out", str(gt), "--query-span", "metadata", "--set", "from=final", "--set", "subsets=2",
                 "--set", "max_steps=3", "--set", "batch_size=8", "--set", "max_length=64",
                 "--set", "learning_rate=1e-2", "--set", "lora.rank=2"]) == 0
    manifest = Store.open(gt).manifest
    assert manifest["measurement"] == {"query_span": "metadata", "per_token": False}
    truth = load_ground_truth(gt)
    assert truth["query_span"] == "metadata"
    # query by query, the recorded loss is the span's NLL under the retrained model, computed directly
    cfg = RetrainConfig(**{k: v for k, v in manifest["config"].items() if k != "lora"}, lora=LoraArgs(rank=2))
    records = as_records(str(task.query))
    retrainer = Retrainer("builtin:tiny", as_records(str(task.train)), "final", cfg, cfg.lora)
    for m in range(2):
        retrainer.fit(subset_mask(0, m, len(task.part), 0.5).nonzero().squeeze(1).tolist(), seed=1000 * m)
        direct = _plain_span_losses(retrainer.model, retrainer.tokenizer, records)
        np.testing.assert_allclose(truth["outcomes"][m], direct, rtol=1e-4, atol=1e-5)
        assert not np.allclose(truth["outcomes"][m], retrainer.losses(records).numpy(), atol=1e-3)  # not whole
    retrainer.close()
    # a whole-response retrain keeps its fingerprint (no query_span key); a span changes it
    assert "query_span" not in featurize_config(RetrainConfig())
    assert featurize_config(RetrainConfig(query_span="metadata"))["query_span"] == "metadata"
    # eval lds takes scores of the ground truth's measurement and refuses another in one line naming both
    score_run(daunce_run, measure="cov", signal="loss", query_span="metadata")
    result = evaluate_lds(gt, [daunce_run], n_bootstrap=20)
    assert result["query_span"] == "metadata" and len(result["methods"]) == 1
    score_run(daunce_run, measure="cov", signal="loss", query_span="response")
    with pytest.raises(RunDirError, match=r"on 'response' but the LDS ground truth .* on 'metadata'"):
        evaluate_lds(gt, [daunce_run], n_bootstrap=20)
    assert main(["eval", "lds", "--ground-truth", str(gt), "--scores", str(daunce_run)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- black-box Daunce with a span


def test_blackbox_daunce_span_equals_the_span_loss_of_each_job_model(task, tmp_path):
    from llm_attr.backends.local import LocalBackend
    from llm_attr.errors import ConfigError
    from llm_attr.losses import evaluate_signal
    from llm_attr.methods.blackbox import BlackBoxConfig, BlackBoxDaunce
    from llm_attr.methods.daunce_tokens import span_rows

    cfg = BlackBoxConfig(perturbations=8, epochs=1, batch_size=8, learning_rate=1e-2, subsample_ratio=0.5,
                         measure="cov", signal="loss", query_span="metadata")
    cfg.local.max_length, cfg.local.lora = 64, LoraArgs(rank=4, alpha=8.0)
    backend = LocalBackend(cfg.local)
    out = BlackBoxDaunce(cfg, backend).run("builtin:tiny", task.train, task.query, tmp_path / "bb")
    info = json.loads((out / "scores.json").read_text())
    assert info["query_span"] == "metadata"
    store = Store.open(out)
    assert store.manifest["measurement"] == {"query_span": "metadata", "per_token": True}
    rows = {s: span_rows(out, store, 8, s, "metadata") for s in ("loss", "margin")}  # [K, Q]
    records = as_records(str(task.query))
    for k in (0, 5):
        model_id = store.manifest["jobs"][str(k)]["model_id"]
        with backend.use_model(model_id) as (model, tokenizer):
            np.testing.assert_allclose(rows["loss"][k].numpy(), _plain_span_losses(model, tokenizer, records),
                                       rtol=1e-4, atol=1e-5)
            examples, _ = tokenize_records(records, tokenizer, 64)
            span_ex = spans.span_examples(records, examples, tokenizer, "metadata")
            pad = pad_id_of(tokenizer)
            white = evaluate_signal(model, list(span_ex), pad, signal=("loss", "margin"))  # white-box span losses
            whole = evaluate_signal(model, list(examples), pad, signal="loss")
        for s in ("loss", "margin"):
            torch.testing.assert_close(rows[s][k], white[s], rtol=1e-5, atol=1e-6)
        shard = store.read_shard(f"perturbation-{k:05d}")
        torch.testing.assert_close(shard["query_loss"], whole, rtol=1e-5, atol=1e-6)  # whole-response rows too
    # the span's scores rank subset 1 (which teaches part 1) first; rescored on part 2 the order turns
    part1 = auc_part1(_scores(out), task.part)
    score_run(out, measure="cov", signal="loss", query_span=PART2)
    part2 = auc_part1(_scores(out), task.part)
    assert part1 > 0.9 and part2 < 0.5, (part1, part2)

    class NoTokens(LocalBackend):
        name, token_logprobs = "no-tokens", False

    with pytest.raises(ConfigError, match="the no-tokens backend gives no per-token log-probabilities") as e:
        BlackBoxDaunce(cfg, NoTokens(cfg.local)).run("builtin:tiny", task.train, task.query, tmp_path / "nt")
    assert "\n" not in str(e.value) and not (tmp_path / "nt" / "manifest.json").exists()
