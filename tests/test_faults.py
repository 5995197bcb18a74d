"""Fault injection: SIGKILL every long command at seeded random points, re-run it, and compare with a clean run.

A reference run of each command counts how often it reaches each fault point (`llm_attr.faults`); the kill points
are drawn (seeded) from those visits. Each killed run must die by SIGKILL, the re-run of the same command must
finish, its results (every safetensors file of the output, bit for bit) must equal the reference, and no completed
work may be redone: every shard complete before the re-run keeps its file (inode and mtime), and a fine-tune resumes
at its last checkpoint. CI runs `CI_POINTS` points per command; `pytest -m slow tests/test_faults.py` runs the full
sweep of `SWEEP_POINTS` per command.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_attr.store import Store

ROOT = Path(__file__).resolve().parent.parent
CI_POINTS = 1
SWEEP_POINTS = 10
SEED = 20261123


@dataclass
class Case:
    argv: list[str]  # the command; OUT is replaced by the output directory
    needs_target: bool = True


def _cases(data: Path, target: Path) -> dict[str, Case]:
    io = ["--train", str(data / "train.jsonl"), "--query", str(data / "query.jsonl"), "--out", "OUT"]
    tiny = ["--set", "max_length=128"]
    return {
        "finetune": Case(["finetune", "--model", "builtin:tiny", "--train", str(data / "train.jsonl"), "--out", "OUT",
                          "--config", "configs/tiny/finetune.yaml", "--set", "max_steps=6", "--set", "save_steps=1",
                          "--set", "batch_size=4", "--set", "lora.dropout=0.1", *tiny], needs_target=False),
        "daunce": Case(["daunce", "--model", str(target), *io, "--config", "configs/daunce.yaml",
                        "--set", "perturbations=4", "--set", "max_steps=3", "--set", "batch_size=4",
                        "--set", "lora.dropout=0.1", *tiny]),
        "gradients": Case(["gradients", "--model", str(target), *io, "--config", "configs/gradients.yaml",
                           "--set", "block_size=4", "--set", "batch_size=4", *tiny]),
        "further-train": Case(["further-train", "--model", str(target), *io,
                               "--config", "configs/tiny/further_training.yaml", "--set", "seeds=1",
                               "--set", "leave_out=3", "--set", "max_steps=4", "--set", "budgets=[2, 4]", *tiny]),
        "retrain": Case(["retrain", "--model", str(target), *io, "--config", "configs/tiny/retrain.yaml",
                         "--set", "subsets=3", "--set", "max_steps=3", *tiny]),
        "black-box": Case(["daunce", "--backend", "local", "--yes", "--model", str(target), *io,
                           "--config", "configs/blackbox.yaml", "--set", "perturbations=3",
                           "--set", "local.max_steps=3", "--set", "local.max_length=128"]),
    }


def run_cli(argv: list[str], out: Path, *, fault: str | None = None, counts: Path | None = None,
            launcher: list[str] | None = None, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_ATTR_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
    env.pop("LLM_ATTR_FAULT", None)
    if fault:
        env["LLM_ATTR_FAULT"] = fault
    if counts:
        env["LLM_ATTR_FAULT_COUNTS"] = str(counts)
    cmd = [*(launcher or [sys.executable, "-m", "llm_attr"]), *[str(out) if a == "OUT" else a for a in argv]]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def results(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under `out` (not the training checkpoints), by file/tensor name."""
    found = {}
    for path in sorted(out.rglob("*.safetensors")):
        rel = path.relative_to(out)
        if rel.parts[0] != "checkpoints":
            found.update({f"{rel}/{k}": v for k, v in load_file(path).items()})
    return found


def complete_work(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every complete store shard, and of every finished training checkpoint, under `out`."""
    done = {}
    if (out / "manifest.json").is_file() and (out / "shards").is_dir():
        store = Store(out)
        for name in store.complete_shards():
            st = store.shard_path(name).stat()
            done[name] = (st.st_ino, st.st_mtime_ns)
    return done


def checkpoint_step(out: Path) -> int:
    steps = [int(p.stem.split("-step")[1]) for p in (out / "checkpoints").glob("rank0-step*.safetensors")]
    return max(steps, default=0)


def assert_same_results(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}: {key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory, tiny_model_dir):
    """Data (12 MATH training records, 3 queries) and a target fine-tuned on them."""
    from llm_attr.data.math_task import make_math
    from llm_attr.data.records import save_jsonl
    from llm_attr.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("faults")
    records = make_math(15, seed=3)
    save_jsonl(records[:12], root / "train.jsonl")
    save_jsonl(records[12:], root / "query.jsonl")
    target = finetune("builtin:tiny", root / "train.jsonl", root / "target",
                      FinetuneConfig(max_steps=4, batch_size=4, max_length=128, save_steps=0))
    return root, _cases(root, target)


@pytest.fixture(scope="module")
def references(fault_env):
    """name -> (results, {fault point: visits}) of one uninterrupted run per command."""
    root, cases = fault_env
    cache = {}

    def get(name: str):
        if name not in cache:
            out, counts = root / f"ref-{name}", root / f"counts-{name}.json"
            proc = run_cli(cases[name].argv, out, counts=counts)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[name] = (results(out), json.loads(counts.read_text()))
        return cache[name]

    return get


def kill_points(visits: dict[str, int], n: int, seed: int) -> list[tuple[str, int]]:
    """`n` distinct (point, visit) pairs drawn from every visit of the reference run, seeded."""
    every = [(p, i) for p, count in sorted(visits.items()) for i in range(1, count + 1)]
    return random.Random(seed).sample(every, min(n, len(every)))


def kill_and_resume(name: str, fault_env, references, points: int, seed: int) -> list[dict]:
    root, cases = fault_env
    want, visits = references(name)
    rows = []
    for point, visit in kill_points(visits, points, seed):
        out = root / f"{name}-{point}-{visit}"
        shutil.rmtree(out, ignore_errors=True)
        killed = run_cli(cases[name].argv, out, fault=f"{point}@{visit}")
        assert killed.returncode == -9, f"{name} {point}@{visit}: not killed ({killed.returncode}): " \
                                        f"{killed.stderr[-2000:]}"
        before, ckpt = complete_work(out), checkpoint_step(out)
        rerun = run_cli(cases[name].argv, out)
        assert rerun.returncode == 0, f"{name} after {point}@{visit}: {rerun.stderr[-3000:]}"
        assert_same_results(results(out), want, f"{name} killed at {point}@{visit}")
        after = complete_work(out)
        redone = [s for s, stat in before.items() if after.get(s) != stat]
        assert not redone, f"{name} killed at {point}@{visit}: re-run rewrote the complete shards {redone}"
        if name == "finetune":
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["resumed_from_step"] == ckpt, (point, visit, manifest["resumed_from_step"], ckpt)
        rows.append({"point": f"{point}@{visit}", "kept": len(before), "resumed_from": ckpt})
    assert rows
    return rows


COMMANDS = ["finetune", "daunce", "gradients", "further-train", "retrain", "black-box"]


@pytest.mark.parametrize("name", COMMANDS)
def test_killed_command_resumes_to_the_uninterrupted_result(name, fault_env, references):
    kill_and_resume(name, fault_env, references, CI_POINTS, SEED + COMMANDS.index(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_full_kill_sweep(name, fault_env, references):
    rows = kill_and_resume(name, fault_env, references, SWEEP_POINTS, SEED + 100 + COMMANDS.index(name))
    print(name, json.dumps(rows))


def test_corrupted_shard_after_a_kill_is_recomputed_not_read(fault_env, references):
    """Kill Daunce after two shards, flip one byte of a finished shard: the re-run reports it, recomputes it."""
    root, cases = fault_env
    want, _ = references("daunce")
    out = root / "daunce-corrupt"
    shutil.rmtree(out, ignore_errors=True)
    assert run_cli(cases["daunce"].argv, out, fault="shard_done@2").returncode == -9
    store = Store(out)
    victim = store.complete_shards()[0]
    blob = bytearray(store.shard_path(victim).read_bytes())
    blob[-1] ^= 0xFF
    store.shard_path(victim).write_bytes(bytes(blob))
    rerun = run_cli(cases["daunce"].argv, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"shard {victim} does not match its checksum" in rerun.stderr
    assert_same_results(results(out), want, "daunce with a corrupted shard")


def test_killing_one_of_two_accelerate_ranks(fault_env, references):
    """Under `accelerate launch` with 2 processes, rank 1 dies after its first shard: the re-run completes."""
    root, cases = fault_env
    want, _ = references("daunce")
    out = root / "daunce-rank1"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llm_attr"]
    killed = run_cli(cases["daunce"].argv, out, fault="shard_done@1:1", launcher=launcher)
    assert killed.returncode != 0
    before = complete_work(out)
    assert before, "rank 1 was killed before any shard was complete"
    rerun = run_cli(cases["daunce"].argv, out, launcher=launcher)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_results(results(out), want, "daunce with rank 1 killed")
    after = complete_work(out)
    assert all(after[s] == stat for s, stat in before.items())


@pytest.mark.parametrize("name", ["daunce", "gradients"])
def test_same_command_and_seed_give_bit_identical_results(name, fault_env, references):
    """Determinism: a second fresh run of the same command, same machine and settings, is bit-identical.

    Same intra-op thread count as the reference: on some CPUs (an Intel Xeon here) oneDNN splits reductions by
    thread count, so 1 and 2 threads differ in the last bits (docs/reliability.md)."""
    root, cases = fault_env
    want, _ = references(name)
    out = root / f"{name}-again"
    shutil.rmtree(out, ignore_errors=True)
    proc = run_cli(cases[name].argv, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_results(results(out), want, f"{name} run twice")
