"""Benchmarks of the gradient attribution family: throughput, storage, memory, a peer library, backdoor retrieval.

    python benchmarks/gradients.py [--sections throughput memory kronfluence backdoor] [--demo DIR] [--json OUT]

- throughput: per-example gradient extraction (`GradientExtractor.per_example`) against a plain forward + backward
  of the same batches (the training step's cost), examples/s and their ratio (goal >= 0.7), for builtin:tiny and a
  ~30M-parameter Llama (random weights, built locally), LoRA rank 16 with random B, exact and LoGra-projected.
- memory: `GradientAttribution.run` (if-ekfac, projection rank 16) in a fresh process per N: peak RSS, featurize
  throughput from the shards' timings, bytes stored per example (goal: peak memory flat in N).
- kronfluence: Kronfluence 1.0.1 EK-FAC (`pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum`) and
  ours (if-ekfac, exact LoRA gradients) on the same model and data, each in a fresh process: time, peak RSS,
  Spearman agreement of the scores.
- backdoor: with `--demo DIR` (from `llm-attr demo --out DIR`): AUPRC of the poisoned training examples for every
  method at several projection ranks, featurized once per rank; `--tracin-checkpoints K` also trains a K-checkpoint
  trajectory for TracIn.

Torch runs with `--threads` intra-op threads (default 1) so that figures are comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("LLM_ATTR_PROGRESS", "0")

REPO = Path(__file__).resolve().parent.parent
LORA_RANK = 16
METHOD_ORDER = ("grad-dot", "grad-cos", "if-fisher", "if-kfac", "if-ekfac")


# ---------------------------------------------------------------------- models and data


def llama30m_dir(cache: Path) -> Path:
    """A ~30M-parameter Llama (hidden 512, 10 layers, random weights, builtin:tiny's tokenizer), saved once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_attr.models.builtin import builtin_model_path
    from llm_attr.models.loading import load_tokenizer

    path = cache / "llama30m"
    if (path / "config.json").is_file():
        return path
    tok = load_tokenizer(str(builtin_model_path("builtin:tiny")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=10,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora_run_dir(base: str, path: Path, seed: int = 0) -> Path:
    """A run directory: `base` plus a LoRA adapter (rank 16, default targets) with B ~ 0.02 N(0, 1), saved once."""
    from llm_attr.models.loading import load_model
    from llm_attr.models.lora import LoraArgs, attach_lora

    if (path / "manifest.json").is_file():
        return path
    model = attach_lora(load_model(base, device="cpu", dtype="float32").model, LoraArgs(rank=LORA_RANK, alpha=32))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path / "adapter")
    (path / "manifest.json").write_text(json.dumps({"base_model": base}))
    return path


def targets(cache: Path) -> dict[str, Path]:
    """name -> run directory of each benchmark model."""
    return {"tiny": lora_run_dir("builtin:tiny", cache / "tiny-lora"),
            "llama30m": lora_run_dir(str(llama30m_dir(cache)), cache / "llama30m-lora")}


def math_files(cache: Path, n_train: int, n_query: int) -> tuple[Path, Path]:
    from llm_attr.data.math_task import make_math
    from llm_attr.data.records import save_jsonl

    train, query = cache / f"math-train-{n_train}.jsonl", cache / f"math-query-{n_query}.jsonl"
    if not train.is_file():
        save_jsonl(make_math(n_train, seed=0), train)
    if not query.is_file():
        save_jsonl([{**r, "id": f"q-{r['id']}"} for r in make_math(n_query, seed=1)], query)
    return train, query


def peak_rss_mib() -> float:
    """This process's peak resident set (MiB): VmHWM, which starts afresh at exec (getrusage's ru_maxrss keeps the
    parent's peak across fork + exec on Linux, so it cannot measure a fresh worker)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ---------------------------------------------------------------------- throughput


def throughput(run: Path, n: int, batch_size: int, reps: int, rows: list[tuple[str, str, int]]) -> list[dict]:
    """Median seconds over `reps` interleaved repeats: plain forward+backward vs each extractor configuration.

    rows: (label, params, projection_rank). `params: lora` times against the LoRA training step; a module pattern
    against the full training step of those layers (their weights require grad).
    """
    from llm_attr.data.records import load_records
    from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
    from llm_attr.losses import model_inputs, per_example_loss
    from llm_attr.methods.gradients import GradientExtractor, select_layers
    from llm_attr.models.loading import load_model

    loaded = load_model(str(run), device="cpu", dtype="float32", merge_adapters=False)
    model, tok = loaded.model.eval(), loaded.tokenizer
    records = load_records(math_files(run.parent, n, 4)[0])
    examples, _ = tokenize_records(records, tok, 256)
    examples = sorted(examples, key=lambda e: e.n_tokens)
    pad = pad_id_of(tok)
    batches = [collate(examples[i : i + batch_size], pad) for i in range(0, n, batch_size)]
    n_tokens = sum(e.n_tokens for e in examples)

    def plain(params: str) -> None:
        trainable = [m.weight for _, m, *_ in select_layers(model, params)]
        for p in model.parameters():
            p.requires_grad_(False)
        for w in trainable:
            w.requires_grad_(True)
        for b in batches:
            model.zero_grad(set_to_none=True)
            per_example_loss(model(**model_inputs(b), use_cache=False).logits, b["labels"]).sum().backward()
        for w in trainable:
            w.requires_grad_(False)
            w.grad = None

    def extract(ext: GradientExtractor) -> None:
        for b in batches:
            ext.per_example(b)

    extractors = {label: GradientExtractor(model, params=params, projection_rank=rank, seed=0)
                  for label, params, rank in rows}
    times: dict[str, list[float]] = {}
    for _ in range(reps):
        for label, params, _rank in rows:
            t0 = time.perf_counter()
            plain(params)
            times.setdefault(f"plain:{params}", []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            extract(extractors[label])
            times.setdefault(label, []).append(time.perf_counter() - t0)
    out = []
    for label, params, rank in rows:
        t_plain, t_ext = statistics.median(times[f"plain:{params}"]), statistics.median(times[label])
        ext = extractors[label]
        out.append({"config": label, "params": params, "projection_rank": rank, "d": ext.dim,
                    "tracked_parameters": sum(layer.in_features * layer.out_features for layer in ext.layers),
                    "n": n, "tokens": n_tokens, "plain_s": t_plain, "extract_s": t_ext,
                    "plain_ex_per_s": n / t_plain, "extract_ex_per_s": n / t_ext, "ratio": t_plain / t_ext,
                    "bytes_per_example_fp32": 4 * ext.dim, "bytes_per_example_bf16": 2 * ext.dim})
    return out


# ---------------------------------------------------------------------- workers (one fresh process each)


def worker(spec: dict) -> dict:
    """Run one measured job in this (fresh) process; returns its figures, peak RSS included."""
    from llm_attr.utils import setup_logging

    setup_logging(logging.WARNING)
    torch.set_num_threads(spec["threads"])
    rss_start = current_rss_mib()
    t0 = time.time()
    if spec["kind"] == "ours":
        from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig, score_run

        shutil.rmtree(spec["out"], ignore_errors=True)  # measure a whole run, not a resumed one

        cfg = GradientConfig(method=spec["method"], projection_rank=spec["rank"], batch_size=spec["batch_size"],
                             block_size=spec.get("block_size", 256), dtype="float32", max_length=256)
        out = Path(spec["out"])
        GradientAttribution(cfg).run(spec["model"], spec["train"], spec["query"], out, score=False)
        t_feat = time.time() - t0
        info = score_run(out, top_k=5)
        shards = [json.loads(p.read_text()) for p in (out / "shards").glob("train-c0-*.json")]
        grad_bytes = sum((out / "shards" / f"{s['name']}.safetensors").stat().st_size for s in shards)
        n = sum(s["meta"]["rows"][1] - s["meta"]["rows"][0] for s in shards)
        result = {"featurize_s": t_feat, "score_s": info["seconds"], "d": info["dim"],
                  "featurize_ex_per_s": n / sum(s["meta"]["seconds"] for s in shards),
                  "stored_bytes_per_example": grad_bytes / n, "scores": str(out / "scores.safetensors")}
    elif spec["kind"] == "kronfluence":
        result = kronfluence_scores(spec)
    else:
        raise ValueError(spec["kind"])
    result.update({"seconds": time.time() - t0, "peak_rss_mib": peak_rss_mib(), "rss_start_mib": rss_start})
    return result


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kronfluence_scores(spec: dict) -> dict:
    """Kronfluence EK-FAC (empirical Fisher, damping 0.1 x mean eigenvalue) on the LoRA modules; scores saved."""
    from kronfluence import Analyzer, Task, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from safetensors.torch import save_file

    from llm_attr.data.records import load_records
    from llm_attr.data.tokenize import collate, pad_id_of, tokenize_records
    from llm_attr.losses import model_inputs, per_example_loss
    from llm_attr.methods.gradients import select_layers
    from llm_attr.models.loading import load_model

    loaded = load_model(spec["model"], device="cpu", dtype="float32", merge_adapters=False)
    model, tok = loaded.model, loaded.tokenizer
    pad = pad_id_of(tok)
    train, _ = tokenize_records(load_records(spec["train"]), tok, 256)
    query, _ = tokenize_records(load_records(spec["query"]), tok, 256)
    names = [name for name, *_ in select_layers(model, "lora")]

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(**model_inputs(batch), use_cache=False).logits
            return per_example_loss(logits, batch["labels"]).sum()  # empirical Fisher: `sample` is never set

        def compute_measurement(self, batch, model):
            return per_example_loss(model(**model_inputs(batch), use_cache=False).logits, batch["labels"]).sum()

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LanguageModelTask()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        loader = DataLoaderKwargs(collate_fn=lambda b: collate(b, pad))
        t0 = time.time()
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=spec["batch_size"], dataloader_kwargs=loader,
                                 factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
        t_factors = time.time() - t0
        analyzer.compute_pairwise_scores("scores", "ekfac", query, train, per_device_query_batch_size=len(query),
                                         per_device_train_batch_size=spec["batch_size"], dataloader_kwargs=loader,
                                         score_args=ScoreArguments(damping_factor=None))
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].float()
    save_file({"scores": scores.contiguous()}, spec["out"])
    return {"factors_s": t_factors, "scores_s": time.time() - t0 - t_factors, "scores": spec["out"]}


def kronfluence_available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


def compare_with_kronfluence(name: str, model: Path, train: Path, query: Path, work: Path, threads: int,
                             batch_size: int, block_size: int = 256, relevant: np.ndarray | None = None) -> dict:
    from safetensors.numpy import load_file
    from scipy.stats import spearmanr

    from llm_attr.evaluation.metrics import retrieval_summary
    from llm_attr.scoring import load_scores

    common = {"model": str(model), "train": str(train), "query": str(query), "threads": threads,
              "batch_size": batch_size, "block_size": block_size}
    ours = run_worker({**common, "kind": "ours", "method": "if-ekfac", "rank": 0, "out": str(work / f"kf-ours-{name}")})
    theirs = run_worker({**common, "kind": "kronfluence", "out": str(work / f"kf-{name}.safetensors")})
    a = np.asarray(load_scores(ours["scores"]), dtype=np.float64)
    b = load_file(theirs["scores"])["scores"].astype(np.float64)
    row = {"model": name, "n_train": a.shape[1], "n_query": a.shape[0],
           "ours_s": ours["seconds"], "kronfluence_s": theirs["seconds"],
           "ours_featurize_s": ours["featurize_s"], "ours_fit_score_s": ours["score_s"],
           "kronfluence_factors_s": theirs["factors_s"], "kronfluence_scores_s": theirs["scores_s"],
           "ours_peak_rss_mib": ours["peak_rss_mib"], "kronfluence_peak_rss_mib": theirs["peak_rss_mib"],
           "spearman_all": float(spearmanr(a.ravel(), b.ravel()).statistic),
           "spearman_per_query": float(np.mean([spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)])),
           "max_rel_diff": float(np.abs(a - b).max() / np.abs(b).max()),
           "ours_scores_path": ours["scores"], "kronfluence_scores_path": theirs["scores"]}
    if relevant is not None:
        row["ours_auprc"] = retrieval_summary(a, relevant)["auprc"]
        row["kronfluence_auprc"] = retrieval_summary(b, relevant)["auprc"]
    return row


# ---------------------------------------------------------------------- backdoor retrieval


def backdoor(demo: Path, work: Path, ranks: list[int], pca_ranks: list[int], batch_size: int,
             tracin_checkpoints: int) -> list[dict]:
    """AUPRC of the poisoned examples per method and projection (Gaussian at `ranks`, PCA at `pca_ranks`; featurized
    once per projection, scored per method)."""
    from llm_attr.data.records import load_records
    from llm_attr.evaluation.metrics import retrieval_summary
    from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig, score_run
    from llm_attr.scoring import load_scores

    relevant = np.array([bool(r.metadata.get("poisoned")) for r in load_records(demo / "train.jsonl")])
    train, query = demo / "train.jsonl", demo / "query_triggered.jsonl"
    rows = []
    for projection, rank in [("gaussian", r) for r in ranks] + [("pca", r) for r in pca_ranks if r]:
        out = work / f"backdoor-{projection}-r{rank}"
        shutil.rmtree(out, ignore_errors=True)  # time a whole run, not a resumed one
        t0 = time.time()
        GradientAttribution(GradientConfig(method="if-ekfac", projection_rank=rank, projection=projection,
                                           batch_size=batch_size, dtype="float32")).run(
            str(demo / "target"), train, query, out, score=False)
        featurize = time.time() - t0
        d = json.loads((out / "manifest.json").read_text())["shapes"]["train_gradients"][1]
        for method in METHOD_ORDER:
            if method == "if-fisher" and d > 8192:
                continue  # a d x d eigendecomposition: minutes beyond this on two CPU cores
            t0 = time.time()
            score_run(out, method=method)
            summary = retrieval_summary(load_scores(out / "scores.safetensors"), relevant)
            rows.append({"method": method, "projection": projection if rank else "exact", "projection_rank": rank,
                         "d": d, "auprc": summary["auprc"],
                         "precision@10": summary["precision@10"], "recall@20": summary["recall@20"],
                         "featurize_s": featurize, "fit_score_s": time.time() - t0,
                         "chance": summary["random_auprc"]})
            print(f"  {projection} rank {rank:>3} d {d:>6} {method:<9} AUPRC {summary['auprc']:.3f}", flush=True)
    if tracin_checkpoints:
        rows += tracin_trajectory(demo, work, tracin_checkpoints, batch_size, relevant)
    return rows


def tracin_trajectory(demo: Path, work: Path, n_checkpoints: int, batch_size: int, relevant: np.ndarray) -> list[dict]:
    """Re-train the demo's target recipe in `n_checkpoints` segments (a cosine cycle each), saving the adapter after
    each; TracIn sums over them (lr: the segment's mean learning rate); Grad-Dot at the last one for comparison."""
    from llm_attr.data.records import load_records
    from llm_attr.data.tokenize import pad_id_of, tokenize_records
    from llm_attr.demo import target_config
    from llm_attr.evaluation.metrics import retrieval_summary
    from llm_attr.methods.gradient_attribution import GradientAttribution, GradientConfig, score_run
    from llm_attr.models.loading import load_model
    from llm_attr.models.lora import attach_lora
    from llm_attr.scoring import load_scores
    from llm_attr.training import train
    from llm_attr.utils import seed_everything

    cfg = target_config()
    run = work / "tracin-target"
    checkpoints = [work / f"tracin-ckpt-{c}" for c in range(n_checkpoints)]
    records = load_records(demo / "train.jsonl")
    total_steps = int(np.ceil(cfg.epochs * len(records) / cfg.batch_size))
    per = total_steps // n_checkpoints
    if not all((c / "adapter_model.safetensors").is_file() for c in checkpoints):
        seed_everything(cfg.seed)
        loaded = load_model("builtin:tiny", device="cpu", dtype="float32")
        model = attach_lora(loaded.model, cfg.lora)
        examples, _ = tokenize_records(records, loaded.tokenizer, cfg.max_length)
        for c, path in enumerate(checkpoints):
            args = type(cfg)(**{**vars(cfg), "max_steps": per, "seed": cfg.seed + c, "warmup_ratio": 0.0})
            train(model, examples, args, pad_id_of(loaded.tokenizer), show_progress=False)
            model.save_pretrained(path)
        model.save_pretrained(run / "adapter")
        (run / "manifest.json").write_text(json.dumps({"base_model": "builtin:tiny"}))
    lr = cfg.learning_rate / 2  # mean of a cosine decay from lr to 0
    rows = []
    for method, extra in (("tracin", {"checkpoints": [{"adapter": str(c), "lr": lr} for c in checkpoints]}),
                          ("grad-dot", {})):
        out = work / f"tracin-{method}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        GradientAttribution(GradientConfig(method=method, projection_rank=0, batch_size=batch_size, dtype="float32",
                                           **extra)).run(str(run), demo / "train.jsonl",
                                                         demo / "query_triggered.jsonl", out, score=False)
        featurize = time.time() - t0
        t0 = time.time()
        score_run(out)
        summary = retrieval_summary(load_scores(out / "scores.safetensors"), relevant)
        rows.append({"method": f"{method} ({n_checkpoints}-checkpoint trajectory)" if method == "tracin"
                     else f"{method} (trajectory's last checkpoint)", "projection": "exact", "projection_rank": 0,
                     "d": json.loads((out / "manifest.json").read_text())["shapes"]["train_gradients"][1],
                     "auprc": summary["auprc"], "precision@10": summary["precision@10"],
                     "recall@20": summary["recall@20"], "featurize_s": featurize, "fit_score_s": time.time() - t0,
                     "chance": summary["random_auprc"]})
        print(f"  {rows[-1]['method']}: AUPRC {summary['auprc']:.3f}", flush=True)
    return rows


# ---------------------------------------------------------------------- main


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table of `rows`; columns: (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) if k in r else "" for k, _, f in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["throughput", "memory", "kronfluence"],
                        choices=["throughput", "memory", "kronfluence", "backdoor"])
    parser.add_argument("--demo", type=Path, help="a `llm-attr demo --out DIR` directory (backdoor, kronfluence)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llm_attr_bench_gradients")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "gradients.json")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--memory-n", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--memory-n-30m", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 8, 16, 64])
    parser.add_argument("--pca-ranks", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--tracin-checkpoints", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from llm_attr.utils import setup_logging

    setup_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    models = targets(args.work)
    results: dict = {"threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if args.json.is_file():
        results = {**json.loads(args.json.read_text()), **results}

    if "throughput" in args.sections:
        rows = []
        for name, n in (("tiny", 128), ("llama30m", 32)):
            configs = [("lora exact", "lora", 0), ("lora rank 16", "lora", 16), ("lora rank 64", "lora", 64)]
            if name == "llama30m":
                configs.append(("all linear, rank 64", r"(q|k|v|o|gate|up|down)_proj\.base_layer$", 64))
            for r in throughput(models[name], n, 16, args.reps, configs):
                rows.append({"model": name, **r})
        results["throughput"] = rows
        print("\n## Gradient extraction vs plain forward+backward\n")
        print(table(rows, [("model", "model", ""), ("config", "gradients of", ""), ("d", "d", "d"),
                           ("plain_ex_per_s", "fwd+bwd ex/s", ".1f"), ("extract_ex_per_s", "extraction ex/s", ".1f"),
                           ("ratio", "ratio", ".2f"), ("bytes_per_example_fp32", "bytes/example fp32", "d")]))

    if "memory" in args.sections:
        rows = []
        for name, ns in (("tiny", args.memory_n), ("llama30m", args.memory_n_30m)):
            for n in ns:
                train, query = math_files(args.work, n, 8)
                spec = {"kind": "ours", "model": str(models[name]), "train": str(train), "query": str(query),
                        "method": "if-ekfac", "rank": 16, "batch_size": 16, "block_size": 256,
                        "threads": args.threads, "out": str(args.work / f"mem-{name}-{n}")}
                r = run_worker(spec)
                rows.append({"model": name, "n_train": n, **{k: v for k, v in r.items() if k != "scores"}})
                print(f"  memory {name} N={n}: peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        results["memory"] = rows
        print("\n## GradientAttribution.run (if-ekfac, projection rank 16) as N grows\n")
        print(table(rows, [("model", "model", ""), ("n_train", "N", "d"), ("d", "d", "d"),
                           ("featurize_ex_per_s", "featurize ex/s", ".1f"), ("seconds", "total s", ".1f"),
                           ("stored_bytes_per_example", "stored bytes/example", ".0f"),
                           ("rss_start_mib", "RSS at start MiB", ".0f"), ("peak_rss_mib", "peak RSS MiB", ".0f")]))

    if "kronfluence" in args.sections:
        if not kronfluence_available():
            print("\nkronfluence is not installed: pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum")
        else:
            rows = []
            if args.demo:
                from llm_attr.data.records import load_records, save_jsonl

                queries = args.work / "demo-queries-8.jsonl"
                save_jsonl(load_records(args.demo / "query_triggered.jsonl")[:8], queries)
                relevant = np.array([bool(r.metadata.get("poisoned"))
                                     for r in load_records(args.demo / "train.jsonl")])
                rows.append(compare_with_kronfluence("tiny backdoor target", args.demo / "target",
                                                     args.demo / "train.jsonl", queries, args.work, args.threads, 16,
                                                     relevant=relevant))
            train, query = math_files(args.work, 64, 8)  # exact LoRA gradients of the 30M model: d = 1.6M
            rows.append(compare_with_kronfluence("llama30m", models["llama30m"], train, query, args.work,
                                                 args.threads, 16, block_size=16))
            results["kronfluence"] = rows
            print("\n## Kronfluence 1.0.1 EK-FAC vs ours (if-ekfac, exact LoRA gradients)\n")
            print(table(rows, [("model", "model", ""), ("n_train", "N", "d"), ("n_query", "Q", "d"),
                               ("ours_s", "ours s", ".1f"), ("kronfluence_s", "Kronfluence s", ".1f"),
                               ("ours_peak_rss_mib", "ours peak MiB", ".0f"),
                               ("kronfluence_peak_rss_mib", "Kronfluence peak MiB", ".0f"),
                               ("spearman_all", "Spearman", ".6f"), ("max_rel_diff", "max rel. diff", ".1e"),
                               ("ours_auprc", "AUPRC ours", ".3f"), ("kronfluence_auprc", "AUPRC Kronfluence",
                                                                     ".3f")]))

    if "backdoor" in args.sections:
        if not args.demo:
            parser.error("--sections backdoor needs --demo DIR (from `llm-attr demo --out DIR`)")
        rows = backdoor(args.demo, args.work, args.ranks, args.pca_ranks, 16, args.tracin_checkpoints)
        results["backdoor"] = rows
        print("\n## Backdoor retrieval: AUPRC of the poisoned training examples\n")
        print(table(rows, [("method", "method", ""), ("projection", "projection", ""),
                           ("projection_rank", "rank", "d"), ("d", "d", "d"),
                           ("auprc", "AUPRC", ".3f"), ("precision@10", "P@10", ".3f"), ("recall@20", "R@20", ".3f"),
                           ("featurize_s", "featurize s", ".1f"), ("fit_score_s", "fit+score s", ".1f")]))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
