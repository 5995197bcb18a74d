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

logger = logging.getLogger("llm_attr")

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (the command's config dataclass)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one config key"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-attr", description="Training-data attribution for fine-tuned LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="LoRA fine-tune a model into a run directory")
    p.add_argument("--model", required=True, help="builtin:tiny, a model dir, a .gguf file, a hub id or a run dir")
    p.add_argument("--train", required=True, help="JSONL file or saved datasets directory")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory holding another config")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    p.add_argument("--columns", help="map fields to the data's columns, e.g. prompt=question,response=answer")
    _add_config_args(p)

    p = sub.add_parser("data", help="make built-in data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    m = dsub.add_parser("make", help="generate a built-in task as JSONL")
    m.add_argument("task", choices=["math", "ifeval", "backdoor"])
    m.add_argument("--n", type=int, default=240, help="number of (training) records")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="JSONL file to write (training records for backdoor)")
    m.add_argument("--source", choices=["math", "ifeval"], default="math", help="backdoor: the clean task")
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

    p = sub.add_parser("demo", help="the built-in end-to-end demo: backdoor, fine-tune, attribute")
    p.add_argument("--out", default="demo_run", help="directory for the demo's files")
    return parser


@command("finetune")
def _finetune(args: argparse.Namespace) -> None:
    from .config import load_config
    from .finetune import FinetuneConfig, finetune

    config = load_config(FinetuneConfig, args.config, args.overrides)
    finetune(args.model, args.train, args.out, config, overwrite=args.overwrite,
             trust_remote_code=args.trust_remote_code, columns=parse_columns(args.columns))


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """`"prompt=question,response=answer"` -> `{"prompt": "question", "response": "answer"}`."""
    if not spec:
        return None
    pairs = [p.split("=", 1) for p in spec.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise LlmAttrError(f"--columns {spec!r}: expected ours=theirs pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}


@command("data")
def _data(args: argparse.Namespace) -> None:
    from .data.records import save_jsonl

    if args.task == "math":
        from .data.math_task import make_math

        records = make_math(args.n, seed=args.seed)
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

    run_demo(Path(args.out))


def main(argv: list[str] | None = None) -> int:
    from .utils import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO)
    try:
        COMMANDS[args.command](args)
    except LlmAttrError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
