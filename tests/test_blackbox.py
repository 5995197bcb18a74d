"""Black-box Daunce: the `openai` backend over real HTTP against a fake service backed by the local backend.

(Spans through black-box Daunce, against white-box span losses: tests/test_spans.py.)

One fake server (tests/fake_openai_server.py) serves the whole module; jobs train builtin:tiny on 40 records.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_attr.backends import (
    BackendError,
    CostNotConfirmed,
    JobFailedError,
    JobTimeoutError,
    LocalBackend,
    OpenAIBackend,
)
from llm_attr.backends.base import signals_from_token_logprobs
from llm_attr.data.records import save_jsonl
from llm_attr.errors import ConfigError
from llm_attr.methods.blackbox import BlackBoxConfig, BlackBoxDaunce

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def task():
    """(train [40 records, 4 poisoned], triggered queries [4])."""
    from llm_attr.data.backdoor import make_backdoor_task

    train, triggered, _ = make_backdoor_task(n_train=40, n_query=4, fraction=0.1, seed=0)
    return train, triggered


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with FakeOpenAIServer(LocalBackend(work_dir=tmp_path_factory.mktemp("service"))) as s:
        yield s


@pytest.fixture
def service(server, monkeypatch):
    """The fake server, with the environment the openai backend reads pointing at it."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server.release()
    server.rate_limit(0)
    server.fail_next_jobs = 0
    return server


def config(tiny_model_dir, k: int = 4, **openai) -> BlackBoxConfig:
    cfg = BlackBoxConfig(perturbations=k, epochs=1, batch_size=8, subsample_ratio=0.5, seed=3)
    cfg.openai.tokenizer = str(tiny_model_dir)
    cfg.openai.poll_interval, cfg.openai.max_poll_interval = 0.02, 0.1
    for key, value in openai.items():
        setattr(cfg.openai, key, value)
    return cfg


def jobs_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text()).get("jobs", {})


def refuse(estimate) -> bool:
    raise AssertionError(f"confirmation asked for a free backend: {estimate}")


def test_openai_backend_over_http_matches_local_backend(service, task, tiny_model_dir, tmp_path):
    """A full run through the fake service (429s on the way) equals the same run on the local backend."""
    train, queries = task
    cfg = config(tiny_model_dir)
    before = dict(service.counts)
    service.rate_limit(2)  # the first upload is answered 429 twice, then retried by the client
    remote = BlackBoxDaunce(cfg, OpenAIBackend(cfg.openai)).run(str(tiny_model_dir), train, queries,
                                                                tmp_path / "remote", yes=True)
    assert service.counts["429"] - before.get("429", 0) == 2
    assert service.counts["jobs.create"] - before.get("jobs.create", 0) == 4
    assert service.counts["files.create"] - before.get("files.create", 0) == 4
    assert all(j["state"] == "scored" and j["job_id"].startswith("ftjob-") for j in jobs_of(remote).values())

    local = BlackBoxDaunce(cfg, LocalBackend(cfg.local), confirm=refuse).run(
        str(tiny_model_dir), train, queries, tmp_path / "local")
    for k in range(4):
        a = load_file(str(remote / "shards" / f"perturbation-{k:05d}.safetensors"))
        b = load_file(str(local / "shards" / f"perturbation-{k:05d}.safetensors"))
        assert torch.equal(a["subset"], b["subset"])
        for key in ("train_loss", "query_loss", "train_margin", "query_margin", "query_token_loss",
                    "query_token_margin"):  # per-token query rows too: the echo's tokens are the local ones
            torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-5)
    a, b = (load_file(str(run / "shards" / "query-tokens.safetensors")) for run in (remote, local))
    assert torch.equal(a["chars"], b["chars"]) and torch.equal(a["offsets"], b["offsets"])  # same characters
    scores_remote = load_file(str(remote / "scores.safetensors"))["scores"]
    scores_local = load_file(str(local / "scores.safetensors"))["scores"]
    assert scores_remote.shape == (4, 40)
    torch.testing.assert_close(scores_remote, scores_local, atol=5e-3, rtol=0)
    ids = json.loads((remote / "ids.json").read_text())
    assert ids == {"query": [q["id"] for q in queries], "train": [r["id"] for r in train]}
    assert (remote / "topk.md").is_file()

    # a finished run re-run is a no-op: nothing submitted, nothing retrained
    count = service.counts["jobs.create"]
    BlackBoxDaunce(cfg, OpenAIBackend(cfg.openai), confirm=refuse).run(str(tiny_model_dir), train, queries, remote)
    assert service.counts["jobs.create"] == count


def test_failed_job_names_its_id_and_is_resubmitted_by_a_rerun(service, task, tiny_model_dir, tmp_path):
    train, queries = task
    cfg = config(tiny_model_dir, k=2)
    run = tmp_path / "run"
    created = service.counts["jobs.create"]
    service.fail_next_jobs = 1
    with pytest.raises(JobFailedError) as err:
        BlackBoxDaunce(cfg, OpenAIBackend(cfg.openai)).run(str(tiny_model_dir), train, queries, run, yes=True)
    failed_id = f"ftjob-{created + 1:04d}"
    assert service.jobs[failed_id]["status"] == "failed"
    assert failed_id in str(err.value) and "injected failure" in str(err.value) and "re-run" in str(err.value)
    assert jobs_of(run)["0"]["failed_job_ids"] == [failed_id] and jobs_of(run)["0"]["job_id"] is None

    BlackBoxDaunce(cfg, OpenAIBackend(cfg.openai)).run(str(tiny_model_dir), train, queries, run, yes=True)
    assert service.counts["jobs.create"] == created + 3  # 2 jobs + job 0 once more
    assert (run / "scores.safetensors").is_file()


class InterruptedAfterSubmit(OpenAIBackend):
    """Killed right after the service created the job, before its id could be written to the manifest."""

    def submit_finetune(self, *args, **kwargs) -> str:
        super().submit_finetune(*args, **kwargs)
        raise KeyboardInterrupt


def test_interrupted_submission_is_adopted_and_slow_job_times_out_clearly(service, task, tiny_model_dir, tmp_path):
    train, queries = task
    cfg = config(tiny_model_dir, k=2, job_timeout=0.3)
    run = tmp_path / "run"
    service.hold()  # slow jobs: they stay running
    created = service.counts["jobs.create"]
    with pytest.raises(KeyboardInterrupt):
        BlackBoxDaunce(cfg, InterruptedAfterSubmit(cfg.openai)).run(str(tiny_model_dir), train, queries, run,
                                                                     yes=True)
    assert jobs_of(run)["0"]["state"] == "submitting" and "job_id" not in jobs_of(run)["0"]
    assert service.counts["jobs.create"] == created + 1

    with pytest.raises(JobTimeoutError) as err:
        BlackBoxDaunce(cfg, OpenAIBackend(cfg.openai)).run(str(tiny_model_dir), train, queries, run, yes=True)
    first = f"ftjob-{created + 1:04d}"
    assert service.counts["jobs.create"] == created + 2  # job 0 adopted by its tag, job 1 submitted
    assert jobs_of(run)["0"]["job_id"] == first
    assert first in str(err.value) and "running" in str(err.value) and "not submitted again" in str(err.value)
    for job_id in (first, f"ftjob-{created + 2:04d}"):
        service.cancel(job_id)


def test_kill_between_submit_and_wait_resumes_without_resubmitting(service, task, tiny_model_dir, tmp_path):
    """A real `llm-attr daunce --backend openai` process is SIGKILLed while waiting; the re-run only waits."""
    from llm_attr.cli import main

    train, queries = task
    save_jsonl(train, tmp_path / "train.jsonl")
    save_jsonl(queries, tmp_path / "query.jsonl")
    run = tmp_path / "run"
    cli_args = ["-q", "daunce", "--backend", "openai", "--model", str(tiny_model_dir),
                "--train", str(tmp_path / "train.jsonl"), "--query", str(tmp_path / "query.jsonl"), "--out", str(run),
                "--yes", "--set", "perturbations=3", "--set", "epochs=1", "--set", "batch_size=8", "--set", "seed=3",
                "--set", f"openai.tokenizer={tiny_model_dir}", "--set", "openai.poll_interval=0.02",
                "--set", "openai.max_poll_interval=0.1"]
    service.hold()
    created = service.counts["jobs.create"]
    proc = subprocess.Popen([sys.executable, "-m", "llm_attr", *cli_args], env=os.environ.copy(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            jobs = jobs_of(run) if (run / "manifest.json").is_file() else {}
            if len(jobs) == 3 and all(j.get("state") == "submitted" for j in jobs.values()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)  # it is polling the (held) jobs now
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert service.counts["jobs.create"] == created + 3
    assert not (run / "scores.safetensors").exists()

    service.release()
    assert main(cli_args) == 0
    assert service.counts["jobs.create"] == created + 3  # waited for the recorded jobs, submitted none
    assert (run / "scores.safetensors").is_file()
    assert {j["job_id"] for j in jobs_of(run).values()} == {f"ftjob-{created + i:04d}" for i in (1, 2, 3)}


def test_cost_must_be_confirmed_before_paid_jobs(service, task, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from llm_attr.cli import main

    train, queries = task
    save_jsonl(train, tmp_path / "train.jsonl")
    save_jsonl(queries, tmp_path / "query.jsonl")
    args = ["daunce", "--backend", "openai", "--model", str(tiny_model_dir), "--train", str(tmp_path / "train.jsonl"),
            "--query", str(tmp_path / "query.jsonl"), "--out", str(tmp_path / "run"), "--set", "perturbations=3",
            "--set", "openai.price_train_per_mtok=8", "--set", "openai.price_score_per_mtok=0.5"]
    counts = (service.counts["files.create"], service.counts["jobs.create"])

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal, no --yes: refused
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cost estimate: 3 fine-tuning job(s)" in err and "training tokens" in err and "$" in err
    assert "--yes" in err and "nothing was submitted" in err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))  # a terminal, answered no
    assert main(args) == 2
    assert "not confirmed" in capsys.readouterr().err
    assert (service.counts["files.create"], service.counts["jobs.create"]) == counts
    assert not any(j.get("job_id") for j in jobs_of(tmp_path / "run").values())

    # the estimate: subset tokens x epochs for training, K x (N + Q) tokens for scoring (exact with a tokenizer)
    method = BlackBoxDaunce(BlackBoxConfig(perturbations=3, epochs=2, openai=config(tiny_model_dir).openai),
                            OpenAIBackend(config(tiny_model_dir).openai), confirm=lambda e: False)
    with pytest.raises(CostNotConfirmed):
        method.run(str(tiny_model_dir), train, queries, tmp_path / "run2")
    tokens, exact = method.backend.count_tokens(str(tiny_model_dir), method_records(train, queries))
    assert exact and method.estimate.score_tokens == 3 * sum(tokens)
    assert method.estimate.jobs_to_submit == 3 and method.estimate.train_tokens > 0


def method_records(train, queries):
    from llm_attr.data.records import as_records

    return as_records(train) + as_records(queries)


def test_api_errors_are_reported_not_lost(service, task, tiny_model_dir, tmp_path):
    train, queries = task
    cfg = config(tiny_model_dir, k=2, max_retries=1)
    service.rate_limit(5)  # more 429s than the client retries
    with pytest.raises(BackendError, match=r"uploading training file .*HTTP 429.*Rate limit"):
        BlackBoxDaunce(cfg, OpenAIBackend(cfg.openai)).run(str(tiny_model_dir), train, queries, tmp_path / "r",
                                                           yes=True)
    service.rate_limit(0)
    assert jobs_of(tmp_path / "r")["0"]["state"] == "submitting"  # a re-run first looks for it by its tag

    backend = OpenAIBackend(cfg.openai)
    with pytest.raises(JobFailedError, match="ftjob-9999: not found"):
        backend.wait("ftjob-9999")
    with pytest.raises(BackendError, match="ft:nope.*does not exist"):
        backend.response_signals("ft:nope", method_records(train, queries)[:2])


def test_config_and_environment_errors(monkeypatch):
    with pytest.raises(ConfigError, match="subsample_ratio"):
        from llm_attr.config import load_config

        load_config(BlackBoxConfig, overrides=["subsample_ratio=1.0"])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BackendError, match="OPENAI_API_KEY"):
        OpenAIBackend()
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(BackendError, match=r"pip install 'llm_attr\[openai\]'"):
        OpenAIBackend()


def test_signals_from_token_logprobs_match_the_project_losses():
    from llm_attr.losses import per_example_signal

    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 7, 1, 9]])
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, labels[0, 1:].clamp(min=0)[:, None])[:, 0]
    response = logp[1:].tolist()  # positions predicting labels 2..5
    got = signals_from_token_logprobs([response])
    torch.testing.assert_close(got["loss"], per_example_signal(logits, labels, "loss"))
    torch.testing.assert_close(got["margin"], per_example_signal(logits, labels, "margin"))


def test_one_process_per_run_directory(tmp_path, task):
    import subprocess
    import sys

    from llm_attr.errors import RunDirError

    train, queries = task
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llm_attr.io import run_lock\n"
                               "with run_lock(sys.argv[1]): print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by pid {holder.pid}"):
            BlackBoxDaunce(BlackBoxConfig(perturbations=2), LocalBackend()).run("builtin:tiny", train, queries,
                                                                               tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
