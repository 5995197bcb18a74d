"""Run-directory locks (`llm_attr.io.run_lock`): a second run on a directory is refused naming the holder's pid, a
stale lock is taken over, the ranks of one run hold one lock each, and every writing command takes it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm_attr import io
from llm_attr.errors import DataError, RunDirError
from llm_attr.io import run_lock

HOLDER = """
import sys, time
from llm_attr.io import run_lock
with run_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a directory (env: its rank); yields `start(out, env) -> Popen`."""
    procs = []

    def start(out: Path, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **env})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_lock(out: Path, pid: int, rank: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{io.LOCK_PREFIX}{rank}"
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "llm-attr daunce",
                                "started": "earlier"}))
    return path


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_second_process_is_refused_naming_the_holder(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    with pytest.raises(RunDirError, match=rf"in use by pid {proc.pid} on .* started .*; wait for it or stop it"):
        with run_lock(out, "daunce"):
            pass
    proc.kill()
    proc.wait()
    with run_lock(out, "daunce"):  # the kernel dropped the dead holder's lock: taken over
        info = json.loads((out / ".lock.0").read_text())
        assert info["pid"] == os.getpid() and info["what"] == "daunce"
    assert not (out / ".lock.0").exists()


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-fcntl"])
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, flock):
    if not flock:
        monkeypatch.setattr(io, "fcntl", None)
    out = tmp_path / "run"
    write_lock(out, dead_pid())
    with run_lock(out, "gradients"):
        assert json.loads((out / ".lock.0").read_text())["pid"] == os.getpid()
    assert not (out / ".lock.0").exists() and out.is_dir()


def test_no_fcntl_live_holder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "fcntl", None)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", sleeper.pid)
        with pytest.raises(RunDirError, match=f"in use by pid {sleeper.pid}"):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ranks_of_one_run_do_not_block_each_other(tmp_path, holder, monkeypatch):
    out = tmp_path / "run"
    proc = holder(out, RANK="1")
    assert (out / ".lock.1").is_file()
    with run_lock(out):  # rank 0 of the same run
        assert (out / ".lock.0").is_file()
    monkeypatch.setenv("RANK", "1")  # rank 1 of a second run
    with pytest.raises(RunDirError, match=f"pid {proc.pid}"):
        with run_lock(out):
            pass


def test_lock_is_reentrant_and_a_refused_new_run_leaves_no_directory(tmp_path):
    out = tmp_path / "run"
    with run_lock(out), run_lock(out):  # run() calling score_run() on its own directory
        pass
    assert out.is_dir()  # created by a run that succeeded: kept
    for error in (ValueError, DataError):  # left empty, whatever the error: removed
        with pytest.raises(error), run_lock(tmp_path / "empty"):
            raise error("bad input")
        assert not (tmp_path / "empty").exists()
    with pytest.raises(DataError), run_lock(tmp_path / "refused"):  # input refused before any work: removed
        (tmp_path / "refused" / "manifest.json").write_text("{}")
        raise DataError("bad input")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError), run_lock(tmp_path / "failed"):  # a failure mid-run keeps its records
        (tmp_path / "failed" / "manifest.json").write_text('{"jobs": {"0": {"job_id": "j"}}}')
        raise ValueError("job failed")
    assert (tmp_path / "failed" / "manifest.json").is_file()
    resumable = tmp_path / "resumable"
    with pytest.raises(DataError), run_lock(resumable):
        (resumable / "shards").mkdir()
        (resumable / "shards" / "perturbation-00000.json").write_text("{}")
        raise DataError("query file broken after the shards")
    assert (resumable / "shards" / "perturbation-00000.json").is_file()  # a re-run resumes from it
    (out / "results.txt").write_text("earlier")
    with pytest.raises(ValueError), run_lock(out):
        raise ValueError("bad input")
    assert (out / "results.txt").read_text() == "earlier"  # existing directories are never removed


def test_lock_files_do_not_change_fingerprints_or_resume(tmp_path, tiny_model_dir):
    import shutil

    import torch

    from llm_attr.fingerprints import model_fingerprint
    from llm_attr.store import Store

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = model_fingerprint(str(model))
    write_lock(model, dead_pid())
    assert model_fingerprint(str(model)) == before
    store = Store.create(tmp_path / "store", method="m", fingerprint="f", header={})
    store.write_shard("a", {"x": torch.ones(2)})
    with run_lock(tmp_path / "store"):
        again = Store.create(tmp_path / "store", method="m", fingerprint="f", header={})
        assert again.missing(["a"]) == [] and again.complete_shards() == ["a"]


@pytest.mark.parametrize("command", ["daunce", "gradients", "further-train", "retrain", "finetune"])
def test_cli_on_a_locked_directory_exits_with_one_line_naming_the_pid(tmp_path, holder, capsys, command):
    from llm_attr.cli import main
    from llm_attr.data.math_task import make_math
    from llm_attr.data.records import save_jsonl

    save_jsonl(make_math(8, seed=0), tmp_path / "train.jsonl")
    save_jsonl(make_math(2, seed=1), tmp_path / "query.jsonl")
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "earlier.json").write_text("{}")
    proc = holder(out)
    argv = [command, "--model", "builtin:tiny", "--train", str(tmp_path / "train.jsonl"), "--out", str(out)]
    if command != "finetune":
        argv += ["--query", str(tmp_path / "query.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"in use by pid {proc.pid}" in err and "wait for it or stop it" in err
    assert (out / "shards" / "earlier.json").read_text() == "{}" and (out / ".lock.0").is_file()
