"""`llm-attr <command>`: one subcommand per phase. Also `python -m llm_attr`.

Every command that takes a config accepts `--config F.yaml` (the command's dataclass as YAML) and repeated
`--set key=value` overrides. Errors a user can fix print as one line (`error: ...`) and exit with status 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import LlmAttrError
from .io import DISK_FULL
from .methods.registry import PRECONDITIONERS

logger = logging.getLogger("llm_attr")

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _add_config_args(p: argparse.ArgumentParser, config_class: str) -> None:
    """--config, --set and --print-config of a command whose config dataclass is `config_class` ("module:Name");
    its fields, defaults and help are listed at the end of the command's --help."""
    p.add_argument("--config", help="YAML config file (the command's config dataclass; a shipped config's name, "
                   "e.g. configs/daunce.yaml, works from any folder)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one config key"
    )
    p.add_argument("--print-config", action="store_true",
                   help="print the complete resolved config (defaults, --config, --set) as YAML and exit")
    p.set_defaults(config_class=config_class)


def config_class_of(args: argparse.Namespace) -> type | None:
    """The config dataclass of the parsed command (`daunce --backend`: the black-box config), or None."""
    import importlib

    spec = getattr(args, "config_class", None)
    if getattr(args, "backend", None):
        spec = "llm_attr.methods.blackbox:BlackBoxConfig"
    if not spec:
        return None
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose --help ends with the command's config keys (imported only when help is shown)."""

    def format_help(self) -> str:
        spec = self.get_default("config_class")
        if spec and not self.epilog:
            from .config import config_help

            self.formatter_class = argparse.RawDescriptionHelpFormatter
            self.epilog = config_help(config_class_of(argparse.Namespace(config_class=spec)))
        return super().format_help()


def _print_config(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """`llm-attr CMD --print-config [--config F] [--set k=v]`: the resolved config as YAML (other flags optional)."""
    from .config import config_yaml, load_config

    def relax(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if action.option_strings:
                action.required = False
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    relax(child)

    relax(parser)
    args = parser.parse_args(argv)
    cls = config_class_of(args)
    if cls is None:
        raise LlmAttrError(f"`llm-attr {args.command}` has no config")
    print(config_yaml(load_config(cls, args.config, args.overrides)), end="")
    return 0


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model and reads records: --trust-remote-code, --base, and the data
    flags (`_add_data_args`)."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own code (auto_map) to run; off by default")
    p.add_argument("--base", metavar="DIR_OR_ID",
                   help="the base model of an adapter given as --model, when it is not where its adapter_config.json "
                        "(base_model_name_or_path) says")
    _add_data_args(p)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """--columns and --chat: how every command that reads records maps the data's fields onto ours."""
    g = p.add_argument_group("data columns", "map the data's own fields onto id, prompt, response, messages")
    g.add_argument("--columns", metavar="OURS=THEIRS,...",
                   help="field names, e.g. prompt=question,response=answer or messages=conversations,id=uid")
    g.add_argument("--chat", metavar="KEY=VALUE,...",
                   help="chat convention of messages-style columns, e.g. role=from,content=value,user=human,"
                        "assistant=gpt,system=system")


def _add_featurize_args(p: argparse.ArgumentParser, model_help: str, out_help: str) -> None:
    """--model, --train, --query, --out, the model and data flags, --overwrite: every featurize command's."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--train", required=True, help="training records (JSONL or saved datasets directory)")
    p.add_argument("--query", required=True, help="query records whose behaviour to attribute")
    p.add_argument("--out", required=True, help=out_help + " (a new or empty directory, or a run of this kind)")
    _add_trust_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace a run directory holding another run")


QUERY_SPAN_HELP = ("the query measurement (config key query_span): response (default) | a regex over the response "
                   "text, e.g. 'boxed\\{.*?\\}' (re:PATTERN forces a regex) | metadata (metadata.span [start, end]) "
                   "| task (MATH: the \\boxed{} answer; backdoor: the target phrase)")


def _add_query_span_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query-span", metavar="SPAN", help=QUERY_SPAN_HELP)


def _with_query_span(config, args: argparse.Namespace):
    """`config` with `--query-span` applied (set after YAML parsing: a regex is never read as YAML)."""
    if getattr(args, "query_span", None):
        from .data.spans import check_span

        config.query_span = check_span(args.query_span)
    return config


def _add_scored_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-score", action="store_true", help="only featurize (score later with `llm-attr score`)")
    p.add_argument("--top-k", type=int, default=10, help="rows per query in the top-k table")


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The options of `score` and `query`: each applies to the store kinds named (others refuse it by name)."""
    p.add_argument("--method", choices=list(PRECONDITIONERS),
                   help="gradient runs: score with this method (default: the run's config)")
    p.add_argument("--damping", type=float, help="gradient runs: absolute damping λ (default: the run's config)")
    p.add_argument("--measure", choices=["cov", "corr"], help="Daunce runs; default: the run's config")
    p.add_argument("--signal", choices=["loss", "margin"], help="Daunce runs; default: the run's config")
    p.add_argument("--perturbations", type=int, help="Daunce runs: use the first K perturbations only")
    _add_query_span_arg(p)
    p.add_argument("--per-token", action="store_true",
                   help="per-token scores: Daunce [tokens, N] per query with each token's top training examples "
                        "(scorings/<tag>-tokens/); gradient runs (query only): one row per response token")
    p.add_argument("--query-id", help="Daunce --per-token: only this query (default: every query)")
    p.add_argument("--rows", choices=["full", "blocks"], help="Daunce runs recorded with row_blocks: score the "
                   "block rows (the default there) or the full rows")
    p.add_argument("--top-k", type=int, default=10, help="rows per query in the top-k table")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-attr", description="Training-data attribution for fine-tuned LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="LoRA fine-tune a model into a run directory")
    p.add_argument("--model", required=True, help="builtin:tiny, a model dir, a .gguf file, a hub id or a run dir")
    p.add_argument("--train", required=True, help="JSONL file or saved datasets directory")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory holding another config")
    _add_trust_arg(p)
    _add_config_args(p, "llm_attr.finetune:FinetuneConfig")

    p = sub.add_parser("data", help="make built-in data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    m = dsub.add_parser("make", help="generate a built-in task as JSONL")
    m.add_argument("task", choices=["math", "ifeval", "backdoor"])
    m.add_argument("--n", type=int, default=240, help="number of (training) records")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="JSONL file to write (training records for backdoor)")
    m.add_argument("--source", choices=["math", "ifeval"], default="math", help="backdoor: the clean task")
    m.add_argument("--templates", help="math: comma-separated problem kinds (default all; 'one-step' = word "
                   "add/sub/mul/div, the level SmolLM2-135M learns)")
    m.add_argument("--fraction", type=float, default=0.05, help="backdoor: fraction of records poisoned")
    m.add_argument("--n-query", type=int, default=16, help="backdoor: held-out queries to write")
    m.add_argument("--query-out", help="backdoor: JSONL of triggered queries")
    m.add_argument("--clean-query-out", help="backdoor: JSONL of the same queries without the trigger")

    p = sub.add_parser("model", help="built-in models")
    msub = p.add_subparsers(dest="model_command", required=True)
    b = msub.add_parser("build", help="build (or find cached) a builtin model and print its directory")
    b.add_argument("name", nargs="?", default="builtin:tiny", help="builtin:tiny or builtin:smollm2-135m")
    b.add_argument("--force", action="store_true", help="rebuild builtin:tiny even if cached")

    p = sub.add_parser("generate", help="greedy responses of a model to a JSONL file's prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", help="JSONL with a 'generated' field per record (default: print)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    _add_trust_arg(p)

    p = sub.add_parser("demo", help="the built-in end-to-end demo: backdoor, fine-tune, attribute")
    p.add_argument("--out", default="demo_run", help="directory for the demo's files")
    p.add_argument("--model", default="builtin:tiny", help="base model: builtin:tiny (a minute on a CPU) or a real "
                   "one, e.g. builtin:smollm2-135m (about 13 minutes on 2 shared CPU cores; demo.REAL_MODEL settings)")

    p = sub.add_parser("daunce", help="Daunce attribution: K perturbed fine-tunes of the target, then scores")
    _add_featurize_args(p, "the target: a fine-tuned run dir, a model dir or builtin:tiny",
                        "run directory (store, adapters, scores); re-run to resume")
    p.add_argument("--backend", choices=["local", "openai"],
                   help="black-box Daunce: K fine-tuning jobs and response log-probs through this backend "
                        "(config: llm_attr.methods.blackbox.BlackBoxConfig); default: white-box Daunce")
    p.add_argument("--yes", action="store_true", help="black-box: confirm the cost estimate of paid jobs")
    _add_query_span_arg(p)
    _add_scored_run_args(p)
    _add_config_args(p, "llm_attr.methods.daunce:DaunceConfig")

    p = sub.add_parser("gradients", help="projected-gradient attribution: Grad-Dot/Cos, TracIn, influence (Fisher, "
                       "K-FAC, EK-FAC)")
    _add_featurize_args(p, "the target: a fine-tuned run dir (params: lora), or any model",
                        "run directory (gradient store, scores); re-run to resume")
    _add_query_span_arg(p)
    _add_scored_run_args(p)
    _add_config_args(p, "llm_attr.methods.gradient_attribution:GradientConfig")

    p = sub.add_parser("score", help="(re)score a run: scores.safetensors, ids.json, topk.md")
    p.add_argument("run", help="a run directory written by `llm-attr daunce`, `gradients` or `further-train`")
    _add_scoring_args(p)
    p.add_argument("--self", dest="self_influence", action="store_true",
                   help="self-influence (variance over k per training example) instead of query scores")

    p = sub.add_parser("query", help="score new queries against a Daunce run (its kept adapters) or a gradient run "
                       "(its stored training gradients), no retraining")
    p.add_argument("run", help="a run directory written by `llm-attr daunce` (keep_adapters: true) or `gradients`")
    p.add_argument("--query", required=True, help="query records (JSONL or saved datasets directory)")
    p.add_argument("--out", required=True, help="a new directory for scores.safetensors, ids.json, topk.md")
    _add_trust_arg(p)
    _add_scoring_args(p)
    _add_evaluation_parsers(sub)
    return parser


def _add_evaluation_parsers(sub) -> None:
    """further-train, retrain, eval lds|compare|backdoor|removal, report (llm_attr.evaluation)."""
    p = sub.add_parser("further-train", help="further-training reference: paired runs from the final model without "
                       "each left-out example (config: llm_attr.methods.further_training.FurtherTrainingConfig)")
    _add_featurize_args(p, "the final model: a fine-tuned run dir (or any model spec)",
                        "run directory (store, reference.safetensors); re-run to resume")
    _add_query_span_arg(p)
    _add_config_args(p, "llm_attr.methods.further_training:FurtherTrainingConfig")

    p = sub.add_parser("retrain", help="LDS ground truth: retrain on M random subsets, record query losses "
                       "(config: llm_attr.evaluation.retrain.RetrainConfig; --set from=base|final)")
    _add_featurize_args(p, "the target run dir (from=base: its base and finetune config)",
                        "store directory; re-run to resume")
    _add_query_span_arg(p)
    _add_config_args(p, "llm_attr.evaluation.retrain:RetrainConfig")

    p = sub.add_parser("eval", help="evaluate attribution scores: lds, compare, backdoor, removal")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("lds", help="LDS of scored runs against a `llm-attr retrain` store, with 95%% CI")
    e.add_argument("--ground-truth", required=True, help="directory written by `llm-attr retrain`")
    e.add_argument("--scores", nargs="+", required=True, help="scored run directories (scores.safetensors, ids)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the queries")
    e.add_argument("--out", help="JSON to write (default: GROUND_TRUTH/lds.json)")
    e = esub.add_parser("compare", help="cosine / Spearman of methods with a further-training reference per budget")
    e.add_argument("--reference", required=True, help="directory written by `llm-attr further-train`")
    e.add_argument("--method", nargs="+", required=True, help="scored run directories (same queries)")
    e.add_argument("--out", help="JSON to write (default: REFERENCE/compare.json)")
    e = esub.add_parser("backdoor", help="precision/recall@k, AUPRC of poisoned examples; optional removal test")
    e.add_argument("--scores", nargs="+", required=True, help="scored run directories (triggered queries)")
    e.add_argument("--train", required=True, help="training records with metadata.poisoned")
    e.add_argument("--k", default="5,10,20", help="k of precision/recall@k")
    e.add_argument("--target", help="target run dir: also retrain without each method's top-k (and k random)")
    e.add_argument("--remove-k", default="12", help="removal sizes, comma-separated (with --target)")
    e.add_argument("--query", help="triggered queries for the success rate (default: the first run's inputs/query.jsonl)")
    e.add_argument("--out", help="JSON to write (default: backdoor.json beside the first run)")
    _add_trust_arg(e)
    _add_config_args(e, "llm_attr.evaluation.removal:RemovalConfig")
    e = esub.add_parser("removal", help="remove each query's top-k, retrain from the base, measure loss + task")
    e.add_argument("--scores", nargs="+", required=True, help="scored run directories")
    e.add_argument("--train", required=True, help="training records")
    e.add_argument("--query", required=True, help="queries (MATH: metadata.answer; IFEval: metadata.instructions)")
    e.add_argument("--target", required=True, help="the target run dir (its base and finetune config)")
    e.add_argument("--model", help="unused: the base is read from the target run (kept for symmetry)")
    e.add_argument("--k", help="removal sizes, comma-separated (default: the config's)")
    e.add_argument("--out", required=True, help="JSON to write (removal.json)")
    _add_trust_arg(e)
    _add_config_args(e, "llm_attr.evaluation.removal:RemovalConfig")

    p = sub.add_parser("report", help="Markdown report with PNG plots from evaluation JSON outputs; report.html "
                       "for scored run directories")
    p.add_argument("inputs", nargs="+", help="eval JSON files, directories holding them, scored run directories")
    p.add_argument("--out", required=True, help="report directory (report.md + PNGs, report.html)")
    p.add_argument("--truth", help="report.html: file of relevant training ids (JSON list or one per line); "
                   "default: metadata.poisoned of the training records")
    p.add_argument("--top-k", type=int, default=10, help="report.html: training examples shown per query")


@command("finetune")
def _finetune(args: argparse.Namespace) -> None:
    from .config import load_config
    from .finetune import FinetuneConfig, finetune

    config = load_config(FinetuneConfig, args.config, args.overrides)
    finetune(args.model, args.train, args.out, config, overwrite=args.overwrite,
             trust_remote_code=args.trust_remote_code, columns=parse_columns(args.columns))


def parse_columns(spec: str | None, flag: str = "--columns") -> dict[str, str] | None:
    """`"prompt=question,response=answer"` -> `{"prompt": "question", "response": "answer"}`."""
    if not spec:
        return None
    pairs = [p.split("=", 1) for p in spec.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise LlmAttrError(f"{flag} {spec!r}: expected key=value pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}


@command("data")
def _data(args: argparse.Namespace) -> None:
    from .data.records import save_jsonl

    if args.task == "math":
        from .data.math_task import ONE_STEP, make_math

        templates = None
        if args.templates:
            templates = ONE_STEP if args.templates == "one-step" else [t for t in args.templates.split(",") if t]
        try:
            records = make_math(args.n, seed=args.seed, templates=templates)
        except ValueError as e:
            raise LlmAttrError(f"--templates: {e}") from None
    elif args.task == "ifeval":
        from .data.ifeval_task import make_ifeval

        records = make_ifeval(args.n, seed=args.seed)
    else:
        from .data.backdoor import make_backdoor_task

        if not 0.0 <= args.fraction <= 1.0:
            raise LlmAttrError(f"--fraction must be in [0, 1], got {args.fraction}")
        records, triggered, clean = make_backdoor_task(
            n_train=args.n, n_query=args.n_query, fraction=args.fraction, seed=args.seed, source=args.source
        )
        if args.query_out:
            save_jsonl(triggered, args.query_out)
            logger.info("wrote %d triggered queries to %s", len(triggered), args.query_out)
        if args.clean_query_out:
            save_jsonl(clean, args.clean_query_out)
            logger.info("wrote %d clean queries to %s", len(clean), args.clean_query_out)
    save_jsonl(records, args.out)
    logger.info("wrote %d %s records to %s", len(records), args.task, args.out)


@command("model")
def _model(args: argparse.Namespace) -> None:
    from .models.builtin import build_tiny_model, builtin_model_path

    if args.name == "builtin:tiny" and args.force:
        path = build_tiny_model(force=True)
    else:
        if not args.name.startswith("builtin:"):
            raise LlmAttrError(f"{args.name}: only builtin models are built; others load directly")
        path = builtin_model_path(args.name)
    print(path)


@command("generate")
def _generate(args: argparse.Namespace) -> None:
    import json

    from .data.records import load_records
    from .generation import generate_responses
    from .io import atomic_write_text
    from .models.loading import load_model

    if args.out and Path(args.out).resolve() == Path(args.data).resolve():
        raise LlmAttrError(f"--out {args.out} is the --data file itself; write the generations to another file")
    records = load_records(args.data)
    loaded = load_model(args.model)
    outputs = generate_responses(
        loaded.model, loaded.tokenizer, records, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        desc="generating",
    )
    rows = [{**r.to_dict(), "generated": g} for r, g in zip(records, outputs, strict=True)]
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        logger.info("wrote %d generations to %s", len(rows), args.out)
    else:
        for r in rows:
            print(json.dumps({"id": r["id"], "generated": r["generated"]}, ensure_ascii=False))


@command("demo")
def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), model=args.model)


@command("daunce")
def _daunce(args: argparse.Namespace) -> None:
    if args.backend:  # black-box Daunce: fine-tuning jobs and log-probs through a backend
        from .methods.blackbox import cli_daunce

        return cli_daunce(args)
    from .methods.daunce import Daunce, DaunceConfig

    _featurize(args, Daunce, DaunceConfig)


def _featurize(args: argparse.Namespace, method_class: type, config_class: type) -> None:
    """`llm-attr daunce|gradients`: build the method from its config, run it into --out, print the top-k table."""
    from .config import load_config
    from .scoring import scores_line

    method = method_class(_with_query_span(load_config(config_class, args.config, args.overrides), args))
    method.run(args.model, args.train, args.query, args.out, overwrite=args.overwrite, score=not args.no_score,
               top_k=args.top_k)
    if method.scores is not None:  # the main process scored
        print(method.scores["table"])
        print(scores_line(args.out))


@command("gradients")
def _gradients(args: argparse.Namespace) -> None:
    from .methods.gradient_attribution import GradientAttribution, GradientConfig

    _featurize(args, GradientAttribution, GradientConfig)


@command("score")
def _score(args: argparse.Namespace) -> None:
    from .methods.registry import method_for
    from .store import Store

    entry = method_for(Store.open(args.run).manifest.get("method"), args.run)
    _print_scoring(entry.run_score(args.run, args.top_k, self_influence=args.self_influence, **_scoring_options(args)))


def _scoring_options(args: argparse.Namespace) -> dict:
    """The options of `score` and `query` (each method takes its own and refuses the others by name)."""
    return {"measure": args.measure, "signal": args.signal, "perturbations": args.perturbations,
            "method": args.method, "damping": args.damping, "query_span": args.query_span,
            "per_token": args.per_token, "query_id": args.query_id, "rows": args.rows}


def _print_scoring(info: dict) -> None:
    print(info["table"])
    print(info["files"])


@command("query")
def _query(args: argparse.Namespace) -> None:
    from .methods.registry import method_for
    from .store import Store

    entry = method_for(Store.open(args.run).manifest.get("method"), args.run)
    _print_scoring(entry.run_query(args.run, args.query, args.out, args.top_k, **_scoring_options(args)))


def _ints(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise LlmAttrError(f"{spec!r}: expected comma-separated integers") from None


def _write_eval(path: Path, result: dict) -> None:
    from .io import atomic_write_json

    atomic_write_json(path, result)
    print(f"wrote {path}")


@command("further-train")
def _further_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .methods.further_training import FurtherTraining, FurtherTrainingConfig

    config = _with_query_span(load_config(FurtherTrainingConfig, args.config, args.overrides), args)
    out = FurtherTraining(config).run(args.model, args.train, args.query, args.out, overwrite=args.overwrite)
    if _is_main_process():
        print(f"reference: {out / 'reference.safetensors'}   scores (largest budget): {out / 'scores.safetensors'}")


def _is_main_process() -> bool:
    from .context import run_context

    return run_context().is_main_process


@command("retrain")
def _retrain(args: argparse.Namespace) -> None:
    from .config import load_config
    from .evaluation.retrain import RetrainConfig, alias_overrides, retrain

    config = _with_query_span(load_config(RetrainConfig, args.config, alias_overrides(args.overrides)), args)
    out = retrain(args.model, args.train, args.query, args.out, config, overwrite=args.overwrite)
    if _is_main_process():
        print(f"ground truth: {out}")


@command("eval")
def _eval(args: argparse.Namespace) -> None:
    from .evaluation import compare

    if args.eval_command == "lds":
        result = compare.evaluate_lds(args.ground_truth, args.scores, n_bootstrap=args.bootstrap)
        print(compare.format_lds(result))
        _write_eval(Path(args.out or Path(args.ground_truth) / "lds.json"), result)
    elif args.eval_command == "compare":
        result = compare.compare_with_reference(args.reference, args.method)
        print(compare.format_compare(result))
        _write_eval(Path(args.out or Path(args.reference) / "compare.json"), result)
    elif args.eval_command == "backdoor":
        from .config import load_config
        from .data.records import load_records
        from .evaluation.backdoor import backdoor_retrieval, format_retrieval
        from .evaluation.removal import RemovalConfig, format_removal, removal_study

        result = backdoor_retrieval(args.scores, args.train, tuple(_ints(args.k)))
        print(format_retrieval(result))
        if args.target:
            cfg = load_config(RemovalConfig, args.config, args.overrides)
            cfg.k = _ints(args.remove_k)
            from .store import run_input

            query = args.query or run_input(args.scores[0], "query")
            if query is None:
                raise LlmAttrError(f"{args.scores[0]}: holds no copy of its queries (inputs/query.jsonl); pass --query")
            methods = [compare.load_scores(r) for r in args.scores]
            result["removal"] = removal_study(args.target, load_records(args.train), load_records(query), methods,
                                              cfg, per_query=False, task="backdoor")
            print(format_removal(result["removal"]))
            _write_eval(Path(args.scores[0]).parent / "backdoor_removal.json" if not args.out
                        else Path(args.out).with_name("backdoor_removal.json"), result["removal"])
        _write_eval(Path(args.out or Path(args.scores[0]).parent / "backdoor.json"), result)
    else:
        from .config import load_config
        from .data.records import load_records
        from .evaluation.removal import RemovalConfig, format_removal, removal_study

        cfg = load_config(RemovalConfig, args.config, args.overrides)
        if args.k:
            cfg.k = _ints(args.k)
        methods = [compare.load_scores(r) for r in args.scores]
        result = removal_study(args.target, load_records(args.train), load_records(args.query), methods, cfg,
                               per_query=True)
        print(format_removal(result))
        _write_eval(Path(args.out), result)


@command("report")
def _report(args: argparse.Namespace) -> None:
    from .evaluation.report import write_report

    print(f"report: {write_report(args.inputs, args.out, top_k=args.top_k, truth=args.truth)}")


def one_line(message: str) -> str:
    """An error message on one line (messages quoted from other libraries may span several)."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    from .data.records import data_mapping
    from .models.loading import base_model, remote_code_trusted
    from .utils import setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--print-config" in argv:
        try:
            return _print_config(build_parser(), argv)
        except LlmAttrError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO)
    try:
        with (remote_code_trusted(getattr(args, "trust_remote_code", False)), base_model(getattr(args, "base", None)),
              data_mapping(parse_columns(getattr(args, "columns", None)),
                           parse_columns(getattr(args, "chat", None), "--chat"))):
            COMMANDS[args.command](args)
    except LlmAttrError as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk is the user's to fix; other OS errors are bugs until shown otherwise
        if args.debug or e.errno not in DISK_FULL:
            raise
        from .io import disk_full_message

        print(f"error: {one_line(disk_full_message(e.filename or 'a write', e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
