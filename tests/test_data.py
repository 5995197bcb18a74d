"""Records, tokenisation with response masks, truncation reports (bad input: tests/test_bad_inputs.py)."""

from __future__ import annotations

import json

import pytest

from llm_attr.data.records import Record, load_records, save_jsonl
from llm_attr.data.tokenize import IGNORE_INDEX, collate, tokenize_records
from llm_attr.errors import DataError
from llm_attr.models.loading import load_tokenizer

GOOD = {"id": "a", "prompt": "What is 2 + 3?", "response": "2 + 3 = 5. \\boxed{5}"}


# Bad input (malformed JSON, missing or empty fields, wrong types, duplicate ids...): one table, run through the
# CLI, in tests/test_bad_inputs.py.


def test_jsonl_roundtrip_chat_records_and_column_mapping(tmp_path):
    records = [
        Record(id="1", prompt="p", response="r", metadata={"k": 1}),
        Record(id="2", messages=[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]),
    ]
    save_jsonl(records, tmp_path / "r.jsonl")
    loaded = load_records(tmp_path / "r.jsonl")
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in records]
    assert loaded[1].prompt_text() == "u" and loaded[1].response_text() == "a"

    (tmp_path / "m.jsonl").write_text(json.dumps({"id": 7, "question": "q?", "answer": "a!"}) + "\n")
    (rec,) = load_records(tmp_path / "m.jsonl", columns={"prompt": "question", "response": "answer"})
    assert (rec.id, rec.prompt, rec.response) == ("7", "q?", "a!")


def test_saved_dataset_and_data_directory(tmp_path):
    from datasets import Dataset

    rows = {"question": ["q1", "q2"], "answer": ["a1", "a2"], "source": ["x", "y"]}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    recs = load_records(tmp_path / "saved", columns={"prompt": "question", "response": "answer"})
    assert [(r.id, r.prompt, r.response, r.metadata["source"]) for r in recs] == [
        ("saved:0", "q1", "a1", "x"),  # id-less rows: NAME:ROW, never the bare row index train and query share
        ("saved:1", "q2", "a2", "y"),
    ]
    # A directory of data files goes through datasets.load_dataset, as a hub name would.
    (tmp_path / "files").mkdir()
    save_jsonl([GOOD], tmp_path / "files" / "train.jsonl")
    (rec,) = load_records(tmp_path / "files")
    assert rec.id == "a" and rec.response == GOOD["response"]


def test_response_mask_covers_exactly_the_response(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    rec = Record(id="a", prompt=GOOD["prompt"], response=GOOD["response"])
    (ex,), report = tokenize_records([rec], tok, max_length=128)
    assert report.n_truncated == 0
    resp = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    prompt = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX]
    # the labelled tokens are a suffix: the response followed by the end-of-turn token
    assert ex.input_ids[len(prompt):] == resp
    assert tok.decode(resp, skip_special_tokens=True) == GOOD["response"]
    assert resp[-1] == tok.eos_token_id
    assert GOOD["prompt"] in tok.decode(prompt)
    assert "<|assistant|>" in tok.decode(prompt)


def test_tokenizer_without_chat_template(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = None
    rec = Record(id="a", prompt="Add 1 and 2.", response="3")
    (ex,), _ = tokenize_records([rec], tok)
    resp = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(resp[:-1]) == "3" and resp[-1] == tok.eos_token_id


def test_truncation_is_reported_and_never_silently_drops_a_response(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    long_prompt = " ".join(["apples"] * 200)
    recs = [Record(id="long", prompt=long_prompt, response="5"), Record(id="short", prompt="hi", response="5")]
    examples, report = tokenize_records(recs, tok, max_length=32)
    assert report.n_truncated == 1 and report.truncated_ids == ["long"]
    assert report.prompt_tokens_lost > 0 and report.response_tokens_lost == 0
    assert len(examples[0].input_ids) == 32
    assert sum(lab != IGNORE_INDEX for lab in examples[0].labels) == sum(
        lab != IGNORE_INDEX for lab in examples[1].labels
    )
    with pytest.raises(DataError, match=r"record 1 \(id 'x'\).*'response'.*truncation"):
        tokenize_records([Record(id="x", prompt="p", response="r " * 100)], tok, max_length=1, source="f.jsonl")


def test_collate_padding_sides_and_positions(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    recs = [Record(id="a", prompt="hi", response="yes"), Record(id="b", prompt="a longer prompt here", response="no")]
    examples, _ = tokenize_records(recs, tok)
    for side in ("left", "right"):
        batch = collate(examples, tok.pad_token_id, padding_side=side)
        for row, ex in enumerate(examples):
            mask = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == ex.input_ids
            assert batch["position_ids"][row][mask].tolist() == list(range(len(ex.input_ids)))
            assert batch["labels"][row][~mask].eq(IGNORE_INDEX).all()


def test_lazy_records_and_flat_examples_equal_the_eager_ones(tmp_path, tiny_model_dir):
    """A JSONL file is held as offsets (records re-parsed on access) and its tokens in one flat array; both give
    exactly what eager lists gave, the fingerprint of earlier runs included, and a file edited under a run is
    refused rather than read."""
    import os

    import numpy as np

    from llm_attr.data.math_task import make_math
    from llm_attr.data.records import LazyRecords, as_records, records_fingerprint
    from llm_attr.data.tokenize import Example, Examples, encode_record, token_lengths
    from llm_attr.io import fingerprint

    eager = list(as_records(make_math(50, seed=1)))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r.to_dict()) for r in eager[:20]) + "\n\n"  # a blank line is skipped
                    + "\n".join(json.dumps(r.to_dict()) for r in eager[20:]) + "\n")
    lazy = load_records(path)
    assert isinstance(lazy, LazyRecords) and len(lazy) == 50 and lazy.ids == [r.id for r in eager]
    assert [r.to_dict() for r in lazy] == [r.to_dict() for r in eager]
    assert lazy[37] == eager[37] and lazy[-1] == eager[-1] and lazy[10:13] == eager[10:13]
    assert records_fingerprint(lazy) == fingerprint([r.to_dict() for r in eager])  # old run dirs stay valid
    save_jsonl(lazy, tmp_path / "copy.jsonl")
    assert [r.to_dict() for r in load_records(tmp_path / "copy.jsonl")] == [r.to_dict() for r in eager]

    tok = load_tokenizer(str(tiny_model_dir))
    examples, _ = tokenize_records(lazy, tok, max_length=48)  # some truncated
    assert isinstance(examples, Examples) and len(examples) == 50
    for i, (e, r) in enumerate(zip(examples, eager, strict=True)):
        p_ids, r_ids = encode_record(r, tok)
        keep = max(min(len(p_ids), 48 - len(r_ids)), 1)
        ids = (p_ids[len(p_ids) - keep:] + r_ids)[:48]
        want = Example(i, r.id, ids, [IGNORE_INDEX] * keep + ids[keep:])
        assert e == want, r.id
    assert token_lengths(examples) == [len(e.input_ids) for e in examples]
    both = examples + tokenize_records(lazy[:3], tok, max_length=48)[0]
    assert len(both) == 53 and both[51].input_ids == examples[1].input_ids and both[51].index == 51
    assert collate([both[51]], 0)["labels"].tolist() == [examples[1].labels]
    # one flat array, 2 bytes a token for this 1,030-token vocabulary
    assert examples._tokens.dtype == np.uint16 and examples._tokens.size == sum(token_lengths(examples))

    stamp = path.stat()
    path.write_text(path.read_text().replace("math-00003", "math-0000X"))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))
    with pytest.raises(DataError, match="changed while in use"):
        lazy[3]
