"""Every benchmark of the toolkit in one command, on one machine, in one run: phase throughput against the hardware's
own baselines, memory and disk as N grows, accuracy per cost (LDS against wall time), and peer libraries.

    python benchmarks/run.py                      # full run (~12 min on 2 CPU cores), docs/img/*.png
    python benchmarks/run.py --quick              # small sizes (a few minutes): to check the machinery
    python benchmarks/run.py --sections phases memory accuracy peers [--threads 1] [--work DIR] [--json OUT]

Sections (each in a fresh subprocess, so its peak memory, `VmHWM`, is its own):

- phases: each phase as a ratio to the same machine's baseline for the same model and data (builtin:tiny):
  a Daunce perturbation (training + loss-matrix row) against a plain LoRA epoch, the loss-matrix evaluation
  against plain batched inference (`benchmarks/daunce.py`); gradient extraction against a plain forward + backward
  (`benchmarks/gradients.py`); scoring (`scoring.covariance_scores` / `score_inner_products` into the memory-mapped
  scores file) against a plain `torch.matmul` of the same shapes; plus a torch.profiler table of one perturbation.
- memory: peak RSS and disk per example as N grows, a fresh process per N: a gradient store (if-ekfac, Gaussian
  projection rank 8: featurize, fit, score) and a Daunce run (K = 2 perturbations of `max_steps` 2 each, θ₀ cache
  off: its size is bounded by `theta0_cache_mb` anyway; then both loss-matrix rows of every example, and scoring).
- accuracy: LDS (ground truth: `llm-attr retrain`, 16 random halves, as `recipes/lds.sh`) against wall time, for
  Daunce at K = 4..256 (prefixes of one K = 256 run, scored margin/corr and loss/cov) and the gradient methods at
  projection ranks 8, 16, 64 and exact.
- peers: Kronfluence 1.0.1 EK-FAC on the same LoRA modules, data and loss (time, peak memory, LDS), next to ours
  (if-ekfac, exact gradients) in fresh processes; dattri 0.3.0's `lds` recomputes every LDS of the accuracy
  section as a cross-check. Peers: `bash benchmarks/install_peers.sh` (never runtime dependencies).

Writes `--json` (default benchmarks/results/run.json; `--quick`: run_quick.json) with the machine, and plots to
`--plots` (default docs/img; `--quick`: the work directory). Torch runs with `--threads` intra-op threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("LLM_ATTR_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import daunce as daunce_bench  # noqa: E402
import gradients as grad_bench  # noqa: E402

REPO = grad_bench.REPO
SECTIONS = ("phases", "memory", "accuracy", "peers")
GOALS = {"daunce_perturbation": ("<=", 1.3), "loss_matrix": (">=", 0.9), "extraction": (">=", 0.7),
         "scoring": (">=", 0.7)}
SIZES = {
    "quick": {"repeats": 2, "extract_n": 64, "extract_ranks": [0, 16],
              "scoring": [["daunce", 32, 64, 1 << 15], ["gradients", 64, 7168, 1024]],
              "memory_n": [256, 1024, 4096], "daunce_k": 16, "ks": [4, 8, 16], "ranks": [16, 0]},
    "full": {"repeats": 5, "extract_n": 128, "extract_ranks": [0, 16, 64],
             "scoring": [["daunce", 32, 64, 1 << 18], ["daunce", 64, 16, 1 << 18], ["gradients", 64, 7168, 8192],
                         ["gradients", 16, 69632, 2048]],
             "memory_n": [1000, 10000, 100000], "daunce_k": 256, "ks": [4, 8, 16, 32, 64, 128, 256],
             "ranks": [8, 16, 64, 0]},
}
MEMORY_RANK = 8
LDS_N_TRAIN, LDS_N_QUERY = 64, 16
GRADIENT_METHODS = ("grad-dot", "grad-cos", "if-fisher", "if-kfac", "if-ekfac")
#: Daunce scored from the same store with its default signal and with the one LDS measures (the query's loss)
DAUNCE_SCORINGS = (("margin", "corr"), ("loss", "cov"))


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                         * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def median_interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable over `reps` rounds, the callables alternating within a round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


# ---------------------------------------------------------------------- phases


def scoring_throughput(shapes: list, reps: int, work: Path) -> list[dict]:
    """Our chunked scoring into a memory-mapped scores file vs a plain in-memory `torch.matmul` of the same shapes.

    daunce (K, Q, N): `covariance_scores` (corr) of `[K, Q]` query signals against the `[K, N]` train signals
    prepared once per store (`prepare_train_signals`: centred and scaled; its time is reported as `prepare_s`)
    vs `[Q, K] @ [K, N]`.
    gradients (Q, d, N): `score_inner_products` of `[Q, d]` against `[N, d]` in the store's read-back chunks vs
    `[Q, d] @ [d, N]`. Ours includes the file (created, filled, flushed and fsynced by `ScoreFile.commit`); the
    kernel alone (the same call into an in-memory tensor) is reported beside it.
    """
    from llm_attr.methods.gradient_store import SCORE_CHUNK_ELEMENTS
    from llm_attr.scoring import ScoreFile, covariance_scores, prepare_train_signals, score_inner_products

    gen = torch.Generator().manual_seed(0)
    path = work / "scoring-bench.safetensors"
    rows = []
    for kind, a, b, n in shapes:
        if kind == "daunce":
            k, n_query = a, b
            query, train = torch.randn(k, n_query, generator=gen), torch.randn(k, n, generator=gen)
            flops = 2 * k * n_query * n

            t0 = time.perf_counter()  # once per store and (signal, measure, K): RUN/prepared/
            prepared = prepare_train_signals(train, torch.empty(k, n), measure="corr")
            prepare_s = time.perf_counter() - t0

            def ours(query=query, prepared=prepared, n_query=n_query, n=n) -> None:
                sf = ScoreFile(path, (n_query, n))
                covariance_scores(query, prepared, measure="corr", out=sf.array, prepared=True)
                sf.commit()

            def kernel(query=query, prepared=prepared) -> None:
                covariance_scores(query, prepared, measure="corr", prepared=True)

            def plain(query=query, train=train) -> None:
                torch.matmul(query.T, train)
            shape = {"K": k, "Q": n_query, "N": n, "prepare_s": prepare_s}
        else:
            n_query, d = a, b
            query, train = torch.randn(n_query, d, generator=gen), torch.randn(n, d, generator=gen)
            rows_per_chunk = max(1, SCORE_CHUNK_ELEMENTS // d)
            flops = 2 * n_query * d * n

            def ours(query=query, train=train, n_query=n_query, n=n, r=rows_per_chunk) -> None:
                sf = ScoreFile(path, (n_query, n))
                score_inner_products(query, (train[s:s + r] for s in range(0, n, r)), n_train=n, out=sf.array)
                sf.commit()

            def kernel(query=query, train=train, n=n, r=rows_per_chunk) -> None:
                score_inner_products(query, (train[s:s + r] for s in range(0, n, r)), n_train=n)

            def plain(query=query, train=train) -> None:
                torch.matmul(query, train.T)
            shape = {"Q": n_query, "d": d, "N": n}
        plain()  # warm-up
        ours()
        t = median_interleaved({"plain": plain, "ours": ours, "kernel": kernel}, reps)
        rows.append({"kind": kind, **shape, "plain_s": t["plain"], "ours_s": t["ours"], "kernel_s": t["kernel"],
                     "kernel_ratio": t["plain"] / t["kernel"],
                     "plain_gflops": flops / t["plain"] / 1e9, "ours_gflops": flops / t["ours"] / 1e9,
                     "ratio": t["plain"] / t["ours"]})
        del query, train
    path.unlink(missing_ok=True)
    return rows


def profile_table(fn, top: int = 12) -> list[dict]:
    """torch.profiler over `fn()`: the `top` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def section_phases(p: dict) -> dict:
    work = Path(p["work"])
    model, n_train, overrides = p.get("model", "builtin:tiny"), p.get("n_train", 240), p.get("daunce_set") or {}
    out: dict = {"model": model, "n_train": n_train, "daunce_set": overrides}
    timing = daunce_bench.run_phase(model, "timing", p["repeats"], n_train, overrides)
    out["daunce"] = timing
    if overrides:  # the same phases with configs/daunce.yaml's own settings, for the comparison
        out["daunce_default"] = daunce_bench.run_phase(model, "timing", p["repeats"], n_train, {})
    run = grad_bench.lora_run_dir(model, work / f"{model.replace(':', '-')}-lora")
    rows = [("lora exact" if r == 0 else f"lora rank {r}", "lora", r) for r in p["extract_ranks"]]
    out["extraction"] = grad_bench.throughput(run, p["extract_n"], 16, p["repeats"], rows)
    out["scoring"] = scoring_throughput(p["scoring"], max(3, p["repeats"]), work)
    # where a perturbation's time goes: one plain epoch, and one perturbation (θ₀ cache, training, rows)
    out["profile"] = {"plain_epoch": profile_table(lambda: daunce_bench.run_phase(model, "finetune", 1, n_train,
                                                                                  overrides)),
                      "perturbation": profile_table(lambda: daunce_bench.run_phase(model, "daunce", 1, n_train,
                                                                                    overrides))}
    return out


# ---------------------------------------------------------------------- memory


def daunce_memory_worker(p: dict) -> dict:
    """One Daunce run (K perturbations of `max_steps` steps, θ₀ cache off) plus scoring, in this fresh process."""
    from llm_attr.methods.daunce import Daunce, DaunceConfig, score_run, shard_name
    from llm_attr.store import Store

    rss_start = grad_bench.current_rss_mib()
    out = Path(p["out"])
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = DaunceConfig(perturbations=p["k"], max_steps=p["steps"], keep_adapters=False, theta0_cache_mb=0.0,
                       max_length=256)
    Daunce(cfg).run(p["model"], p["train"], p["query"], out, score=False)
    t_run = time.perf_counter() - t0
    info = score_run(out, measure=cfg.measure, signal=cfg.signal)
    store = Store.open(out)
    per_k = [store.shard_info(shard_name(k))["meta"]["seconds"] for k in range(p["k"])]
    store_bytes = sum(f.stat().st_size for f in (out / "shards").rglob("*") if f.is_file())
    n = p["n"]
    return {"run_s": t_run, "perturbation_s": per_k, "score_s": info["seconds"], "seconds": time.perf_counter() - t0,
            "examples_per_s": (n + p["n_query"]) * p["k"] / sum(per_k),
            "stored_bytes_per_example": store_bytes / n,
            "scores_bytes_per_example": (out / "scores.safetensors").stat().st_size / n,
            "peak_rss_mib": grad_bench.peak_rss_mib(), "rss_start_mib": rss_start}


def section_memory(p: dict) -> dict:
    work = Path(p["work"])
    run = grad_bench.lora_run_dir("builtin:tiny", work / "tiny-lora")
    rows = []
    for n in p["memory_n"]:
        train, query = grad_bench.math_files(work, n, 8)
        common = {"model": str(run), "train": str(train), "query": str(query), "threads": p["threads"]}
        g = grad_bench.run_worker({**common, "kind": "ours", "method": "if-ekfac", "rank": MEMORY_RANK,
                                   "batch_size": 16, "block_size": 256, "out": str(work / f"mem-grad-{n}")})
        g["scores_bytes_per_example"] = Path(g.pop("scores")).stat().st_size / n
        rows.append({"method": f"gradients (if-ekfac, rank {MEMORY_RANK})", "n_train": n, **g})
        shutil.rmtree(work / f"mem-grad-{n}", ignore_errors=True)
        d = run_child("daunce-memory", {**common, "n": n, "n_query": 8, "k": 2, "steps": 2,
                                        "out": str(work / f"mem-daunce-{n}")}, work)
        rows.append({"method": "Daunce (K=2, 2 steps each)", "n_train": n, **d})
        shutil.rmtree(work / f"mem-daunce-{n}", ignore_errors=True)
        print(f"  memory N={n}: gradients {g['peak_rss_mib']:.0f} MiB, Daunce {d['peak_rss_mib']:.0f} MiB",
              file=sys.stderr, flush=True)
    return {"rows": rows}


# ---------------------------------------------------------------------- accuracy per cost


def lds_setup(work: Path) -> dict[str, Path]:
    """recipes/lds.sh's data, target and ground truth (builtin:tiny, configs/tiny), built once into work/lds."""
    d = work / "lds"
    d.mkdir(parents=True, exist_ok=True)
    paths = {"train": d / "train.jsonl", "query": d / "query.jsonl", "target": d / "target",
             "ground_truth": d / "ground_truth"}
    cli = [sys.executable, "-m", "llm_attr"]

    def call(*args: str) -> None:
        with open(work / "setup.log", "a") as log:
            subprocess.run([*cli, *args], check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    if not paths["query"].is_file():
        call("data", "make", "math", "--n", str(LDS_N_TRAIN), "--seed", "0", "--out", str(paths["train"]))
        call("data", "make", "math", "--n", str(LDS_N_TRAIN + LDS_N_QUERY), "--seed", "0", "--out", str(d / "all.jsonl"))
        lines = (d / "all.jsonl").read_text().splitlines()[-LDS_N_QUERY:]
        paths["query"].write_text("\n".join(lines) + "\n")
    call("finetune", "--model", "builtin:tiny", "--train", str(paths["train"]), "--out", str(paths["target"]),
         "--config", "configs/tiny/finetune.yaml")
    call("retrain", "--model", str(paths["target"]), "--train", str(paths["train"]), "--query", str(paths["query"]),
         "--out", str(paths["ground_truth"]), "--config", "configs/tiny/retrain.yaml", "--set", "from=base")
    return paths


def lds_entry(values: np.ndarray, gt: dict) -> dict:
    """Our LDS of `values [Q, N]` (aligned to the ground truth's ids) and dattri's, when installed, as a check."""
    from llm_attr.evaluation.metrics import lds

    ours = lds(values, gt["masks"], gt["outcomes"])
    entry = {"lds": ours["lds"], "ci95": ours["ci95"]}
    try:
        from dattri.metric import lds as dattri_lds
    except ImportError:
        return entry
    kept = torch.as_tensor(np.stack([np.flatnonzero(m) for m in gt["masks"]]))
    corr, _ = dattri_lds(torch.as_tensor(values.T, dtype=torch.float64),
                         (torch.as_tensor(-gt["outcomes"], dtype=torch.float64), kept))
    corr = torch.nan_to_num(corr, nan=0.0).numpy()  # ours scores an undefined (constant) correlation 0
    entry.update({"dattri_lds": float(corr.mean()),
                  "dattri_max_abs_diff": float(np.abs(corr - np.asarray(ours["per_query"])).max())})
    return entry


def section_accuracy(p: dict) -> dict:
    from llm_attr.config import load_config
    from llm_attr.evaluation.compare import load_scores
    from llm_attr.evaluation.metrics import lds
    from llm_attr.evaluation.retrain import load_ground_truth
    from llm_attr.methods import daunce, gradient_attribution
    from llm_attr.store import Store

    work = Path(p["work"])
    paths = lds_setup(work)
    gt = load_ground_truth(paths["ground_truth"])
    target, train, query = str(paths["target"]), paths["train"], paths["query"]

    def aligned(run: Path) -> np.ndarray:
        return load_scores(run).aligned(gt["query_ids"], gt["train_ids"])

    rows = []
    # warm-up: the first model load of a process imports transformers' model code (~3 s here); pay it before any
    # method is timed, so that the method timed first is not charged for it
    from llm_attr.models.loading import load_model

    load_model(target)
    # Daunce: one run of K_max perturbations; K perturbations cost the shared part plus their own shards' seconds
    cfg = load_config(daunce.DaunceConfig, REPO / "configs" / "daunce.yaml",
                      [f"perturbations={p['daunce_k']}", "keep_adapters=false", "max_length=384"])
    out = work / "acc-daunce"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    daunce.Daunce(cfg).run(target, train, query, out, score=False)
    total = time.perf_counter() - t0
    store = Store.open(out)
    per_k = [store.shard_info(daunce.shard_name(k))["meta"]["seconds"] for k in range(p["daunce_k"])]
    shared = total - sum(per_k)
    for signal, measure in DAUNCE_SCORINGS:
        for k in p["ks"]:
            t0 = time.perf_counter()
            daunce.score_run(out, measure=measure, signal=signal, perturbations=k)
            t_score = time.perf_counter() - t0
            rows.append({"method": "Daunce", "scoring": f"{signal}/{measure}", "K": k,
                         "wall_s": shared + sum(per_k[:k]) + t_score, "shared_s": shared,
                         "perturbations_s": sum(per_k[:k]), "score_s": t_score, **lds_entry(aligned(out), gt)})
            print(f"  Daunce {signal}/{measure} K={k}: LDS {rows[-1]['lds']:+.3f}, {rows[-1]['wall_s']:.1f} s",
                  file=sys.stderr, flush=True)
    # gradient methods: featurized once per rank (with the K-FAC statistics every method may use), scored per method
    for rank in p["ranks"]:
        gcfg = load_config(gradient_attribution.GradientConfig, REPO / "configs" / "gradients.yaml",
                           [f"projection_rank={rank}", "method=if-ekfac", "max_length=384"])
        out = work / f"acc-grad-r{rank}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        gradient_attribution.GradientAttribution(gcfg).run(target, train, query, out, score=False)
        t_feat = time.perf_counter() - t0
        d = json.loads((out / "manifest.json").read_text())["shapes"]["train_gradients"][1]
        for method in GRADIENT_METHODS:
            if method == "if-fisher" and d > gradient_attribution.FISHER_FLOAT64_MAX_DIM:
                continue  # a d x d eigendecomposition
            t0 = time.perf_counter()
            gradient_attribution.score_run(out, method=method)
            t_score = time.perf_counter() - t0
            rows.append({"method": method, "projection_rank": rank, "d": d, "wall_s": t_feat + t_score,
                         "featurize_s": t_feat, "score_s": t_score, **lds_entry(aligned(out), gt)})
            print(f"  {method} rank {rank}: LDS {rows[-1]['lds']:+.3f}, {rows[-1]['wall_s']:.1f} s", file=sys.stderr,
                  flush=True)
    noise = np.random.default_rng(0).standard_normal((len(gt["query_ids"]), len(gt["train_ids"])))
    random = lds(noise, gt["masks"], gt["outcomes"])
    return {"rows": rows, "random": {"lds": random["lds"], "ci95": random["ci95"]},
            "ground_truth": {"subsets": int(gt["masks"].shape[0]), "n_train": len(gt["train_ids"]),
                             "n_query": len(gt["query_ids"])}}


# ---------------------------------------------------------------------- peers


def section_peers(p: dict) -> dict:
    from safetensors.numpy import load_file

    from llm_attr.evaluation.compare import Scores, load_scores
    from llm_attr.evaluation.retrain import load_ground_truth

    work = Path(p["work"])
    paths = lds_setup(work)
    gt = load_ground_truth(paths["ground_truth"])
    if not grad_bench.kronfluence_available():
        return {"error": "kronfluence is not installed: bash benchmarks/install_peers.sh"}
    row = grad_bench.compare_with_kronfluence("lds", paths["target"], paths["train"], paths["query"], work,
                                              p["threads"], 16)
    ours_run = Path(row.pop("ours_scores_path")).parent
    ours = load_scores(ours_run).aligned(gt["query_ids"], gt["train_ids"])
    ids = json.loads((ours_run / "ids.json").read_text())  # Kronfluence's rows and columns: the same records
    theirs = Scores("kronfluence", load_file(row.pop("kronfluence_scores_path"))["scores"].astype(np.float64),
                    ids["query"], ids["train"]).aligned(gt["query_ids"], gt["train_ids"])
    return {"kronfluence": {**row, "ours": lds_entry(ours, gt), "kronfluence": lds_entry(theirs, gt)}}


# ---------------------------------------------------------------------- orchestration


def run_child(section: str, params: dict, work: Path) -> dict:
    """Run `section` in a fresh Python process (its own peak RSS); its log goes to work/SECTION.log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(params["threads"]), "LLM_ATTR_PROGRESS": "0"}
    with open(work / f"{section}.log", "a") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", section, "--params", json.dumps(params)],
                              stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (work / f"{section}.log").read_text()[-3000:]
        raise RuntimeError(f"section {section} failed (exit {proc.returncode}); {work / section}.log ends:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def worker(section: str, params: dict) -> dict:
    from llm_attr.utils import setup_logging

    setup_logging(logging.WARNING)
    logging.disable(logging.WARNING)
    torch.set_num_threads(params["threads"])
    rss_start = grad_bench.current_rss_mib()
    t0 = time.perf_counter()
    fn = {"phases": section_phases, "memory": section_memory, "accuracy": section_accuracy,
          "peers": section_peers, "daunce-memory": daunce_memory_worker}[section]
    out = fn(params)
    out.setdefault("peak_rss_mib", grad_bench.peak_rss_mib())
    out.setdefault("rss_start_mib", rss_start)
    out["section_s"] = time.perf_counter() - t0
    return out


def goal_met(name: str, value: float) -> bool:
    op, bound = GOALS[name]
    return value <= bound if op == "<=" else value >= bound


def summary(results: dict) -> dict:
    """Phase ratios against the goals, memory flatness, Daunce against every other method at equal wall time."""
    s: dict = {}
    if "phases" in results:
        ph = results["phases"]
        t = ph["daunce"]
        raw = t["raw"]  # the median of each interleaved pair's ratio: robust to the load changing between pairs
        s["daunce_perturbation"] = {
            "ratio": statistics.median((a + b) / e for a, b, e in zip(raw["train"], raw["evaluate"], raw["epoch"], strict=True)),
            "training_only": statistics.median(a / e for a, e in zip(raw["train"], raw["epoch"], strict=True))}
        if "library_epoch" in raw:  # the same against our own training loop (`training.train`, plain loss)
            s["daunce_perturbation"]["vs_library_epoch"] = statistics.median(
                (a + b) / e for a, b, e in zip(raw["train"], raw["evaluate"], raw["library_epoch"], strict=True))
            s["daunce_perturbation"]["library_epoch_vs_plain"] = statistics.median(
                e / p for e, p in zip(raw["library_epoch"], raw["epoch"], strict=True))
        s["loss_matrix"] = {"ratio": statistics.median(i / g for i, g in zip(raw["inference"], raw["signal"], strict=True))}
        s["extraction"] = {"ratio": min(r["ratio"] for r in ph["extraction"]),
                           "per_config": {r["config"]: r["ratio"] for r in ph["extraction"]}}
        # the goal is about compute: our scoring kernel vs the matmul; the scores file's write + fsync is disk time,
        # reported beside it (`with_file`)
        s["scoring"] = {"ratio": min(r["kernel_ratio"] for r in ph["scoring"]),
                        "per_shape": {" ".join(f"{k}={r[k]}" for k in ("K", "Q", "d", "N") if k in r)
                                      + f" ({r['kind']})": r["kernel_ratio"] for r in ph["scoring"]},
                        "with_file": {" ".join(f"{k}={r[k]}" for k in ("K", "Q", "d", "N") if k in r)
                                      + f" ({r['kind']})": r["ratio"] for r in ph["scoring"]}}
        for name in GOALS:
            s[name]["goal"] = " ".join(map(str, GOALS[name]))
            s[name]["met"] = goal_met(name, s[name]["ratio"])
    if "memory" in results:
        rows = results["memory"]["rows"]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n_train"])
            peaks, per_ex = [r["peak_rss_mib"] for r in mine], [r["stored_bytes_per_example"] for r in mine]
            s.setdefault("memory", {})[method] = {
                "peak_growth": peaks[-1] / peaks[0] - 1, "n_range": [mine[0]["n_train"], mine[-1]["n_train"]],
                "bytes_per_example_spread": max(per_ex) / min(per_ex) - 1,
                "met": peaks[-1] / peaks[0] - 1 <= 0.10}
    if "accuracy" in results:
        rows = results["accuracy"]["rows"]
        others = [r for r in rows if r["method"] != "Daunce"]
        if "peers" in results and "kronfluence" in results["peers"]:
            kf = results["peers"]["kronfluence"]
            others.append({"method": "Kronfluence EK-FAC", "wall_s": kf["kronfluence_s"], **kf["kronfluence"]})
        s["accuracy"] = {}
        for scoring in dict.fromkeys(r.get("scoring", "margin/corr") for r in rows if r["method"] == "Daunce"):
            d = sorted((r for r in rows if r["method"] == "Daunce" and r.get("scoring", "margin/corr") == scoring),
                       key=lambda r: r["wall_s"])
            verdicts = []
            for r in others:
                affordable = [x["lds"] for x in d if x["wall_s"] <= r["wall_s"]]
                best = max(affordable) if affordable else None
                # the cost of matching it: Daunce's first K whose LDS reaches the method's, as a multiple of its time
                reach = next((x for x in d if x["lds"] >= r["lds"]), None)
                verdicts.append({"method": r["method"], "projection_rank": r.get("projection_rank"),
                                 "wall_s": r["wall_s"], "lds": r["lds"], "daunce_lds_within_time": best,
                                 "daunce_above": best is not None and best >= r["lds"],
                                 "daunce_k_to_match": reach["K"] if reach else None,
                                 "daunce_time_ratio_to_match": reach["wall_s"] / r["wall_s"] if reach else None})
            s["accuracy"][scoring] = {"comparisons": verdicts, "met": all(v["daunce_above"] for v in verdicts),
                                      "daunce_above": sum(v["daunce_above"] for v in verdicts), "of": len(verdicts),
                                      "matched": sum(v["daunce_k_to_match"] is not None for v in verdicts)}
    return s


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    return grad_bench.table(rows, columns)


def report(results: dict) -> str:
    """Markdown tables of everything measured (printed, and pasted into docs/benchmarks.md)."""
    out = []
    s = results.get("summary", {})
    if "phases" in results:
        ph = results["phases"]
        t = ph["daunce"]
        rows = [
            {"phase": "Daunce perturbation (training + loss-matrix row)", "baseline": "plain LoRA epoch",
             "ours": f"{t['perturbation_seconds']:.2f} s", "base": f"{t['epoch_seconds']:.2f} s",
             **s["daunce_perturbation"]},
            {"phase": "  training part only", "baseline": "plain LoRA epoch", "ours": f"{t['train_seconds']:.2f} s",
             "base": f"{t['epoch_seconds']:.2f} s", "ratio": s["daunce_perturbation"]["training_only"], "goal": "",
             "met": ""},
            *([{"phase": "  perturbation against our own fine-tuning epoch (`training.train`)",
                "baseline": "llm-attr finetune epoch", "ours": f"{t['perturbation_seconds']:.2f} s",
                "base": f"{t['library_epoch_seconds']:.2f} s", "ratio": s["daunce_perturbation"]["vs_library_epoch"],
                "goal": "", "met": ""},
               {"phase": "  our fine-tuning epoch against the plain one", "baseline": "plain LoRA epoch",
                "ours": f"{t['library_epoch_seconds']:.2f} s", "base": f"{t['epoch_seconds']:.2f} s",
                "ratio": s["daunce_perturbation"]["library_epoch_vs_plain"], "goal": "", "met": ""}]
              if "vs_library_epoch" in s["daunce_perturbation"] else []),
            {"phase": "loss-matrix evaluation (loss + margin rows)", "baseline": "plain batched inference",
             "ours": f"{t['examples'] / t['signal_seconds']:.0f} ex/s",
             "base": f"{t['examples'] / t['inference_seconds']:.0f} ex/s", **s["loss_matrix"]},
        ]
        for r in ph["extraction"]:
            rows.append({"phase": f"gradient extraction, {r['config']} (d={r['d']:,})",
                         "baseline": "plain forward+backward", "ours": f"{r['extract_ex_per_s']:.0f} ex/s",
                         "base": f"{r['plain_ex_per_s']:.0f} ex/s", "ratio": r["ratio"],
                         "goal": s["extraction"]["goal"], "met": goal_met("extraction", r["ratio"])})
        for r in ph["scoring"]:
            shape = ", ".join(f"{k}={r[k]:,}" for k in ("K", "Q", "d", "N") if k in r)
            rows.append({"phase": f"scoring, {'Daunce corr' if r['kind'] == 'daunce' else 'inner products'} "
                         f"({shape})", "baseline": "torch.matmul, same shapes",
                         "ours": f"{r['plain_gflops'] * r['kernel_ratio']:.2f} GFLOP/s",
                         "base": f"{r['plain_gflops']:.2f} GFLOP/s", "ratio": r["kernel_ratio"],
                         "goal": s["scoring"]["goal"], "met": goal_met("scoring", r["kernel_ratio"])})
        for r in rows:
            r["met"] = {True: "**met**", False: "not met", "": ""}[r["met"]]
        out.append("### Phases against the machine's own baselines\n\n" + table(rows, [
            ("phase", "phase", ""), ("ours", "ours", ""), ("baseline", "baseline", ""), ("base", "baseline figure", ""),
            ("ratio", "ratio", ".2f"), ("goal", "goal", ""), ("met", "", "")]))
        out.append("Ratios are medians over interleaved pairs. Scoring is the kernel (into an in-memory tensor, "
                   "as the matmul); with the memory-mapped scores file written and fsynced, end to end: " + ", ".join(
                       f"{r['kind']} {r['ratio']:.2f}x" for r in ph["scoring"]) + " of torch.matmul. Daunce scores "
                   "against train signals prepared once per store (centred, scaled: "
                   + ", ".join(f"{r['prepare_s']:.2f} s" for r in ph["scoring"] if "prepare_s" in r) + ").")
        prof = ph.get("profile", {}).get("perturbation")
        if prof:
            out.append("Top operators of one perturbation (θ₀ cache, training, rows; torch.profiler, self CPU):\n\n"
                       + table(prof, [("op", "op", ""), ("self_cpu_ms", "self CPU ms", ".0f"),
                                      ("share", "share", ".1%"), ("calls", "calls", "d")]))
    if "memory" in results:
        rows = [{**r, "total_bytes_per_example": r["stored_bytes_per_example"] + r["scores_bytes_per_example"]}
                for r in results["memory"]["rows"]]
        out.append("### Memory and disk as N grows\n\n" + table(rows, [
            ("method", "method", ""), ("n_train", "N", ",d"), ("seconds", "total s", ".0f"),
            ("rss_start_mib", "RSS at start MiB", ".0f"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
            ("stored_bytes_per_example", "store bytes/example", ",.0f"),
            ("scores_bytes_per_example", "scores bytes/example", ",.0f")]))
    if "accuracy" in results:
        acc = results["accuracy"]
        rows = [{**r, "method": f"Daunce ({r.get('scoring', 'margin/corr')})" if r["method"] == "Daunce" else
                 r["method"],
                 "label": f"K={r['K']}" if r["method"] == "Daunce" else
                 ("exact" if r["projection_rank"] == 0 else f"rank {r['projection_rank']}"),
                 "ci": f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"} for r in acc["rows"]]
        if "peers" in results and "kronfluence" in results["peers"]:
            kf = results["peers"]["kronfluence"]
            for who, key in (("ours if-ekfac (fresh process)", "ours"), ("Kronfluence EK-FAC", "kronfluence")):
                e = kf[key]
                rows.append({"method": who, "label": "exact", "wall_s": kf[f"{key}_s"], **e,
                             "ci": f"[{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]"})
        rnd = acc["random"]
        rows.append({"method": "random scores", "label": "", "lds": rnd["lds"],
                     "ci": f"[{rnd['ci95'][0]:+.3f}, {rnd['ci95'][1]:+.3f}]"})
        out.append("### Accuracy per cost: LDS against wall time\n\n" + table(rows, [
            ("method", "method", ""), ("label", "K / projection", ""), ("d", "d", ",d"), ("wall_s", "wall s", ".1f"),
            ("lds", "LDS", "+.3f"), ("ci", "95% CI", ""), ("dattri_lds", "LDS by dattri", "+.3f"),
            ("dattri_max_abs_diff", "max per-query diff", ".1e")]))
    if "peers" in results and "kronfluence" in results["peers"]:
        kf = results["peers"]["kronfluence"]
        out.append("### Peer: Kronfluence 1.0.1 EK-FAC against ours (if-ekfac, exact LoRA gradients)\n\n" + table(
            [{**kf, "ours_lds": kf["ours"]["lds"], "kf_lds": kf["kronfluence"]["lds"]}], [
                ("n_train", "N", "d"), ("n_query", "Q", "d"), ("ours_s", "ours s", ".1f"),
                ("kronfluence_s", "Kronfluence s", ".1f"), ("ours_peak_rss_mib", "ours peak MiB", ".0f"),
                ("kronfluence_peak_rss_mib", "Kronfluence peak MiB", ".0f"), ("spearman_all", "Spearman", ".6f"),
                ("max_rel_diff", "max rel. diff", ".1e"), ("ours_lds", "LDS ours", "+.3f"),
                ("kf_lds", "LDS Kronfluence", "+.3f")]))
    return "\n\n".join(out)


def plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "accuracy" in results:
        acc = results["accuracy"]
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for scoring, color in zip(dict.fromkeys(r.get("scoring", "margin/corr") for r in acc["rows"]
                                                if r["method"] == "Daunce"), ("black", "darkgoldenrod"), strict=False):
            d = sorted((r for r in acc["rows"] if r["method"] == "Daunce"
                        and r.get("scoring", "margin/corr") == scoring), key=lambda r: r["K"])
            ax.plot([r["wall_s"] for r in d], [r["lds"] for r in d], "o-", color=color, lw=2,
                    label=f"Daunce, {scoring} (K)")
            for r in d:
                ax.annotate(f"K={r['K']}", (r["wall_s"], r["lds"]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=color)
        for method in GRADIENT_METHODS:
            g = sorted((r for r in acc["rows"] if r["method"] == method), key=lambda r: r["wall_s"])
            if g:
                ax.plot([r["wall_s"] for r in g], [r["lds"] for r in g], "s--", ms=4, label=f"{method} (rank)")
                for r in g:
                    ax.annotate(str(r["projection_rank"] or "exact"), (r["wall_s"], r["lds"]),
                                textcoords="offset points", xytext=(3, 3), fontsize=6)
        if "peers" in results and "kronfluence" in results["peers"]:
            kf = results["peers"]["kronfluence"]
            ax.plot([kf["kronfluence_s"]], [kf["kronfluence"]["lds"]], "*", ms=12, color="tab:red",
                    label="Kronfluence EK-FAC (exact)")
        ax.axhline(acc["random"]["lds"], color="grey", lw=0.8, ls=":", label="random scores")
        ax.set_xscale("log")
        ax.set_xlabel("wall time, s (log; 1 thread)")
        ax.set_ylabel("LDS")
        ax.set_title(f"LDS vs cost: builtin:tiny, {acc['ground_truth']['n_train']} MATH records, "
                     f"{acc['ground_truth']['n_query']} queries, {acc['ground_truth']['subsets']} retrains")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(folder / "lds_vs_time.png", dpi=120)
        plt.close(fig)
        written.append(str(folder / "lds_vs_time.png"))
    if "memory" in results:
        rows = results["memory"]["rows"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n_train"])
            n = [r["n_train"] for r in mine]
            a.plot(n, [r["peak_rss_mib"] for r in mine], "o-", label=method)
            b.plot(n, [(r["stored_bytes_per_example"] + r["scores_bytes_per_example"]) * r["n_train"] / 2**20
                       for r in mine], "o-", label=method)
        a.set_xscale("log")
        a.set_ylim(bottom=0)
        a.set_xlabel("N training examples")
        a.set_ylabel("peak RSS, MiB")
        b.set_xscale("log")
        b.set_yscale("log")
        b.set_xlabel("N training examples")
        b.set_ylabel("disk (store + scores), MiB")
        a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "memory_vs_n.png", dpi=120)
        plt.close(fig)
        written.append(str(folder / "memory_vs_n.png"))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="small sizes (~5 min): checks the machinery")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every section")
    ap.add_argument("--work", type=Path, help="work directory (default: $LLM_ATTR_CACHE or /tmp, /bench-run)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plots", type=Path)
    ap.add_argument("--model", default="builtin:tiny",
                    help="the phases section's model (builtin:smollm2-135m: the real-model figures)")
    ap.add_argument("--n-train", type=int, default=240, help="the phases section's training records")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="DaunceConfig overrides for the phases section (e.g. precision=bf16, lora.layers=4); the "
                         "phases are then measured with them and with the defaults")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.params))), flush=True)
        return
    mode = "quick" if args.quick else "full"
    work = args.work or Path(os.environ.get("LLM_ATTR_CACHE", "/tmp")) / f"bench-run-{mode}"
    work.mkdir(parents=True, exist_ok=True)
    json_path = args.json or REPO / "benchmarks" / "results" / ("run_quick.json" if args.quick else "run.json")
    plot_dir = args.plots or (work if args.quick else REPO / "docs" / "img")
    from llm_attr.config import parse_overrides

    params = {**SIZES[mode], "threads": args.threads, "work": str(work), "model": args.model,
              "n_train": args.n_train, "daunce_set": parse_overrides(args.set)}
    if args.model != "builtin:tiny" and args.json is None:
        json_path = json_path.with_name(json_path.stem + "_" + args.model.split(":")[-1].split("/")[-1] + ".json")
    results: dict = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results.update({"machine": machine(), "mode": mode, "threads": args.threads,
                    "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])})
    t_all = time.perf_counter()
    for section in SECTIONS:  # in this order: peers reuses the accuracy section's ground truth
        if section in args.sections:
            t0 = time.perf_counter()
            print(f"== {section} (log: {work / section}.log)", flush=True)
            results[section] = run_child(section, params, work)
            print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    results["summary"] = summary(results)
    results["seconds"] = time.perf_counter() - t_all
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(report(results))
    for path in plots(results, plot_dir):
        print(f"wrote {path}")
    print(f"wrote {json_path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
