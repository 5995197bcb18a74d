"""The run-directory contract: the tool never touches a user's files, refuses a foreign --out in one line, lets a
corrected command follow a run that computed nothing, keeps every scoring, and never deletes when it reads; and
its progress output in a log file stays small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_attr.cli import main
from llm_attr.data.backdoor import make_backdoor_task
from llm_attr.data.records import save_jsonl
from llm_attr.errors import RunDirError
from llm_attr.methods.daunce import shard_name
from llm_attr.pipeline import check_out
from llm_attr.scoring import covariance_scores
from llm_attr.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

#: --set overrides of a Daunce run small enough for CI: rank-4 LoRA, one optimiser step per perturbation.
TINY = ["--set", "max_steps=1", "--set", "batch_size=8", "--set", "max_length=128", "--set", "lora.rank=4",
        "--set", "lora.alpha=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder holding the user's train.jsonl (24 records, with fields of their own) and query.jsonl (2)."""
    d = tmp_path_factory.mktemp("user")
    train, triggered, _ = make_backdoor_task(n_train=24, n_query=2, fraction=0.125, seed=3)
    rows = [{**r, "source": "my-annotator", "notes": {"checked": True}} for r in train]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    save_jsonl(triggered, d / "query.jsonl")
    return d


def _daunce(train: Path, query: Path, out: Path | str, *extra: str) -> list[str]:
    return ["daunce", "--model", "builtin:tiny", "--train", str(train), "--query", str(query), "--out", str(out),
            *TINY, *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A K = 3 Daunce run on builtin:tiny."""
    out = tmp_path_factory.mktemp("run") / "daunce"
    assert main(_daunce(data / "train.jsonl", data / "query.jsonl", out, "--set", "perturbations=3")) == 0
    return out


def test_out_holding_the_users_inputs_is_refused_in_one_line_and_left_byte_identical(data, tmp_path, monkeypatch,
                                                                                      capsys):
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    monkeypatch.chdir(data)
    assert main(_daunce(Path("train.jsonl"), Path("query.jsonl"), ".")) == 2  # the inputs themselves in --out
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--train train.jsonl lies inside --out ." in err
    for name in ("train.jsonl", "query.jsonl"):  # other files that merely have those names
        (tmp_path / name).write_bytes(before[name])
    assert main(_daunce(tmp_path / "train.jsonl", tmp_path / "query.jsonl", ".")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is neither empty nor a 'daunce' run (it holds query.jsonl, train.jsonl)" in err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # nothing replaced, nothing added


def test_an_input_inside_out_and_a_foreign_out_are_refused_without_none(tmp_path):
    run = tmp_path / "run"
    (run / "inputs").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"store_version": 1, "method": "daunce", "fingerprint": "x"}))
    (run / "inputs" / "train.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="lies inside --out") as e:
        check_out(run, "daunce", {"train": run / "inputs" / "train.jsonl"})
    messages = [str(e.value)]
    with pytest.raises(RunDirError, match="holds a 'daunce' store, not a 'gradients' run") as e:
        check_out(run, "gradients", {"train": tmp_path / "elsewhere.jsonl"})
    messages.append(str(e.value))
    finetuned = tmp_path / "finetuned"
    finetuned.mkdir()
    (finetuned / "manifest.json").write_text(json.dumps({"kind": "finetune", "complete": True}))
    with pytest.raises(RunDirError, match="holds a 'finetune' run, not a 'daunce' run") as e:
        check_out(finetuned, "daunce", {})
    messages.append(str(e.value))
    with pytest.raises(RunDirError, match="already holds a 'finetune' run, not a 'daunce' store") as e:
        Store.create(finetuned, method="daunce", fingerprint="y", header={})
    messages.append(str(e.value))
    for message in messages:
        assert "None" not in message and "unknown" not in message and "a unknown" not in message
    check_out(tmp_path / "new", "daunce", {})  # a new directory, an empty one, or a run of the same kind: accepted
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "daunce", {})
    check_out(run, "daunce", {"train": tmp_path / "elsewhere.jsonl"})


def test_a_run_that_failed_before_its_first_shard_does_not_block_the_corrected_command(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # made by the user beforehand, so the failed run does not remove it
    bad = _daunce(data / "train.jsonl", data / "query.jsonl", out, "--set", "perturbations=2")
    assert main([*bad, "--set", "max_length=1"]) == 2  # every response truncated away: refused after the store
    assert (out / "manifest.json").is_file() and not list((out / "shards").glob("*.json"))
    assert main(bad) == 0
    manifest = Store.open(out, "daunce").manifest
    assert manifest["complete"] and manifest["config"]["max_length"] == 128
    assert sorted(manifest["shards"]) == [shard_name(0), shard_name(1), "query-tokens"]


def test_the_inputs_are_copied_under_inputs_and_every_scoring_is_kept(run, data, capsys):
    assert (run / "inputs" / "train.jsonl").read_text().count("\n") == 24
    assert not (run / "train.jsonl").exists() and not (run / "query.jsonl").exists()
    default = (run / "scores.safetensors").read_bytes()
    assert (run / "scorings" / "corr-margin-K3" / "scores.safetensors").read_bytes() == default
    assert main(["score", str(run), "--measure", "cov", "--signal", "loss"]) == 0
    assert main(["score", str(run), "--measure", "corr", "--signal", "loss", "--perturbations", "2"]) == 0
    shards = [Store(run).read_shard(shard_name(k)) for k in range(3)]
    expected = covariance_scores(torch.stack([s["query_loss"] for s in shards]),
                                 torch.stack([s["train_loss"] for s in shards]), measure="cov")
    kept = load_file(str(run / "scorings" / "cov-loss-K3" / "scores.safetensors"))["scores"]
    assert torch.allclose(kept, expected, atol=1e-6)
    assert (run / "scorings" / "corr-margin-K3" / "scores.safetensors").read_bytes() == default  # not lost
    latest = json.loads((run / "scores.json").read_text())  # the documented names show the latest scoring
    assert (latest["measure"], latest["signal"], latest["perturbations"]) == ("corr", "loss", 2)
    assert sorted(p.name for p in (run / "scorings").iterdir()) == ["corr-loss-K2", "corr-margin-K3", "cov-loss-K3"]
    for tag in ("corr-loss-K2", "cov-loss-K3"):
        assert (run / "scorings" / tag / "topk.md").read_text().count("| query-") == 2 * 10
    capsys.readouterr()


def test_read_commands_never_delete_a_corrupted_shard(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = Store(copy).shard_path(shard_name(1))
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    files = sorted(p.name for p in (copy / "shards").iterdir())
    assert main(["score", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "perturbation-00001" in err and "missing or corrupted" in err
    assert Store(copy).missing([shard_name(0), shard_name(1)]) == [shard_name(1)]
    assert main(["query", str(copy), "--query", str(run / "inputs" / "query.jsonl"), "--out", str(tmp_path / "q")]) == 2
    assert sorted(p.name for p in (copy / "shards").iterdir()) == files and path.read_bytes() == bytes(blob)


def test_a_log_file_of_a_k32_run_is_small_and_q_silences_progress(data, tmp_path):
    env = {**os.environ, "LLM_ATTR_PROGRESS": "1", "OMP_NUM_THREADS": "1"}  # bars allowed: only the log rules
    log = tmp_path / "daunce.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "llm_attr", *_daunce(
            data / "train.jsonl", data / "query.jsonl", tmp_path / "k32", "--set", "perturbations=32",
            "--set", "eval_batch_size=32", "--no-score")], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert log.stat().st_size < 6000, text
    assert "\r" not in text and "it/s" not in text  # no progress bars
    overall = [line for line in text.splitlines() if "perturbation " in line and "/32 done" in line]
    assert 3 <= len(overall) <= 13 and overall[-1].rstrip().endswith("elapsed)") and "32/32" in overall[-1]
    assert any("left)" in line for line in overall)  # a time estimate
    assert "computing 32 of its 32 perturbations" in text  # a sentence, not a list of 32 indices
    quiet = subprocess.run([sys.executable, "-m", "llm_attr", "-q", *_daunce(
        data / "train.jsonl", data / "query.jsonl", tmp_path / "quiet", "--set", "perturbations=2", "--no-score")],
        capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout == ""
    assert not any(mark in quiet.stderr for mark in ("done (", "it/s", "%|", " INFO ")), quiet.stderr


@pytest.mark.parametrize(("kind", "message"), [("retrain", "cannot be scored: it is an LDS ground truth"),
                                                ("no-such-method", "which this version does not know")])
def test_every_store_kind_is_scored_or_refused_with_a_reason(kind, message, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"store_version": 1, "method": kind, "fingerprint": "f"}))
    assert main(["score", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert main(["query", str(run), "--query", "q.jsonl", "--out", str(tmp_path / "q")]) == 2
    assert message.split(":")[-1].strip() in capsys.readouterr().err and not (tmp_path / "q").exists()
