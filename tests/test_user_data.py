"""Data as users have it (issue 16): their column names and chat conventions on every command that reads records,
id-less datasets, a UTF-8 BOM, query ids equal to train ids, and the chat template's response tokens exactly as TRL's
SFTTrainer makes them."""

from __future__ import annotations

import json

import pytest
import torch

from llm_attr.cli import main
from llm_attr.data.records import Record, load_records, save_jsonl
from llm_attr.data.tokenize import encode_record
from llm_attr.results import AttributionResult

pytestmark = pytest.mark.usefixtures("one_thread")

GRAD = ["--model", "builtin:tiny", "--set", "method=grad-dot", "--set", "projection_rank=8", "--set", "params=adapted"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(ours.jsonl, theirs/ datasets folder with question/answer/uid/poisoned columns, query.jsonl) of one data."""
    from datasets import Dataset

    from llm_attr.data.backdoor import make_backdoor_task

    root = tmp_path_factory.mktemp("userdata")
    train, query, _ = make_backdoor_task(n_train=16, n_query=3, fraction=0.25, seed=1)
    save_jsonl(train, root / "ours.jsonl")
    save_jsonl(query, root / "query.jsonl")
    Dataset.from_list([{"uid": r["id"], "question": r["prompt"], "answer": r["response"],
                        "metadata": r["metadata"]} for r in train]).save_to_disk(str(root / "theirs"))
    return root


def _same_scores(a, b) -> None:
    a, b = AttributionResult(a), AttributionResult(b)
    assert a.ids == b.ids
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_columns_on_daunce_gradients_further_train_and_eval(data):
    """Every command reads the data's own columns with --columns and gives what it gives on our field names."""
    cols = ["--columns", "id=uid,prompt=question,response=answer"]
    for name, train in (("ours", data / "ours.jsonl"), ("theirs", data / "theirs")):
        io = ["--train", str(train), "--query", str(data / "query.jsonl")]
        extra = cols if name == "theirs" else []
        assert main(["daunce", "--model", "builtin:tiny", *io, "--out", str(data / f"d_{name}"),
                     "--set", "perturbations=2", *extra]) == 0
        assert main(["gradients", *GRAD, *io, "--out", str(data / f"g_{name}"), *extra]) == 0
        assert main(["further-train", "--model", "builtin:tiny", *io, "--out", str(data / f"f_{name}"),
                     "--set", "seeds=1", "--set", "leave_out=2", "--set", "max_steps=2", "--set", "budgets=[1,2]",
                     *extra]) == 0
        assert main(["eval", "backdoor", "--scores", str(data / f"g_{name}"), "--train", str(train), "--k", "2,4",
                     "--out", str(data / f"b_{name}.json"), *extra]) == 0
    for kind in ("d", "g", "f"):
        _same_scores(data / f"{kind}_ours", data / f"{kind}_theirs")
    ours, theirs = (json.loads((data / f"b_{n}.json").read_text()) for n in ("ours", "theirs"))
    assert ours["n_poisoned"] == theirs["n_poisoned"] == 4  # metadata.poisoned read through the mapping
    (m_ours,), (m_theirs,) = ours["methods"].values(), theirs["methods"].values()
    assert {k: v for k, v in m_ours.items() if k != "run"} == {k: v for k, v in m_theirs.items() if k != "run"}
    assert m_ours["auprc"] > 0.25  # the poisoned ranked above chance


def test_chat_mapping_reads_sharegpt_conversations(data):
    """ShareGPT-style `conversations` (from/value, human/gpt) are the same chats as our `messages`."""
    from datasets import Dataset

    train = load_records(data / "ours.jsonl")
    ours = [{"id": r.id, "messages": r.chat()} for r in train]
    save_jsonl(ours, data / "chat_ours.jsonl")
    roles = {"user": "human", "assistant": "gpt"}
    Dataset.from_list([{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in r["messages"]],
                        "uid": r["id"]} for r in ours]).save_to_disk(str(data / "sharegpt"))
    io = ["--query", str(data / "query.jsonl")]
    assert main(["gradients", *GRAD, "--train", str(data / "chat_ours.jsonl"), *io, "--out", str(data / "c1")]) == 0
    assert main(["gradients", *GRAD, "--train", str(data / "sharegpt"), *io, "--out", str(data / "c2"),
                 "--columns", "messages=conversations,id=uid",
                 "--chat", "role=from,content=value,user=human,assistant=gpt"]) == 0
    _same_scores(data / "c1", data / "c2")


def test_bad_mapping_is_one_line(data, capsys):
    code = main(["gradients", *GRAD, "--train", str(data / "theirs"), "--query", str(data / "query.jsonl"),
                 "--out", str(data / "bad"), "--columns", "question=prompt"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--columns question=...: unknown field 'question'" in err and len(err.splitlines()) == 1


def test_id_less_splits_never_share_ids(tmp_path):
    """A DatasetDict without ids: NAME/SPLIT:ROW, so the train and test splits (both rows 0..) do not collide."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"prompt": ["a", "b"], "response": ["x", "y"]}),
                 "test": Dataset.from_dict({"prompt": ["c"], "response": ["z"]})}).save_to_disk(str(tmp_path / "qa"))
    train, test = load_records(tmp_path / "qa"), load_records(tmp_path / "qa", split="test")
    assert [r.id for r in train] == ["qa/train:0", "qa/train:1"] and [r.id for r in test] == ["qa/test:0"]
    assert [(r.prompt, r.response) for r in test] == [("c", "z")]


def test_jsonl_with_a_bom(tmp_path):
    rows = [{"id": "a", "prompt": "p1", "response": "r1"}, {"id": "b", "prompt": "p2", "response": "r2"}]
    (tmp_path / "bom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    assert (tmp_path / "bom.jsonl").read_bytes()[:3] == b"\xef\xbb\xbf"
    recs = load_records(tmp_path / "bom.jsonl")
    assert [r.to_dict() for r in recs] == [{**r, "metadata": {}} for r in rows]
    assert recs[0].id == "a" and list(recs)[0].id == "a"  # re-read from the file, by offset and in a pass


def test_query_id_equal_to_a_train_id(tmp_path):
    """A query that shares its id with a training record: both kept apart in ids.json, topk and topk.md."""
    train = [Record(id=f"r{i}", prompt=f"What is {i} + {i}?", response=f"{2 * i}") for i in range(6)]
    query = [Record(id="r2", prompt="What is 2 + 2?", response="4"),
             Record(id="q", prompt="What is 5 + 5?", response="10")]
    save_jsonl(train, tmp_path / "t.jsonl")
    save_jsonl(query, tmp_path / "q.jsonl")
    assert main(["gradients", *GRAD, "--train", str(tmp_path / "t.jsonl"), "--query", str(tmp_path / "q.jsonl"),
                 "--out", str(tmp_path / "g"), "--top-k", "6"]) == 0
    result = AttributionResult(tmp_path / "g")
    assert result.ids == {"query": ["r2", "q"], "train": [f"r{i}" for i in range(6)]}
    top = result.topk("r2", 6)
    assert sorted(t for t, _ in top) == [f"r{i}" for i in range(6)]
    assert [s for _, s in top] == sorted(result.scores[0].tolist(), reverse=True)
    rows = [line.split("|") for line in (tmp_path / "g" / "topk.md").read_text().splitlines()
            if line.startswith("| r2 ")]
    assert len(rows) == 6 and {r[3].strip() for r in rows} == {f"r{i}" for i in range(6)}


# A template with text after the end of the assistant turn (a newline, as ChatML templates have): TRL's two ways
# of training on responses differ exactly there.
NEWLINE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["builtin", "newline"])
def test_response_tokens_are_trls(tiny_model_dir, tmp_path, template):
    """Our (prompt, response) tokens against TRL's SFTTrainer's own tokenization and loss mask: a prompt/response
    record is TRL's conversational prompt-completion, a messages record TRL's messages with assistant_only_loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from llm_attr.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    if template == "newline":
        tok.chat_template = NEWLINE_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chats = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5. \\boxed{5}"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."}]]

    def trl_rows(rows, **kw):
        args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, **kw)
        ds = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        return [(r["input_ids"], r["labels"] if "labels" in r else None, r) for r in ds.train_dataset]

    def labelled(ids, mask):
        return [t for t, m in zip(ids, mask, strict=True) if m]

    prompt_completion = trl_rows([{"prompt": c[:-1], "completion": c[-1:]} for c in chats])
    messages = trl_rows([{"messages": c} for c in chats], assistant_only_loss=True)
    for chat, (pc_ids, pc_labels, pc_row), (m_ids, m_labels, m_row) in zip(chats, prompt_completion, messages,
                                                                           strict=True):
        pc_mask = pc_row.get("completion_mask") or [lab != -100 for lab in pc_labels]
        m_mask = m_row.get("assistant_masks") or [lab != -100 for lab in m_labels]
        p, r = encode_record(Record(id="a", prompt=chat[-2]["content"], response=chat[-1]["content"])
                             if len(chat) == 2 else Record(id="a", messages=chat[:-1] + chat[-1:]), tok)
        if len(chat) == 2:  # a prompt/response record: TRL's prompt-completion, every token after the prompt
            assert p + r == pc_ids and r == labelled(pc_ids, pc_mask)
        p, r = encode_record(Record(id="a", messages=chat), tok)
        assert r == labelled(m_ids, m_mask)  # the last (only) assistant turn's tokens by the template's mask
        assert p + r == m_ids[: len(p) + len(r)]
    if template == "newline":  # the two differ by the newline after the turn: we follow each record's form
        pc_ids, pc_labels, pc_row = prompt_completion[0]
        assert tok.decode(labelled(pc_ids, pc_row.get("completion_mask") or [x != -100 for x in pc_labels]))[-1] == "\n"
