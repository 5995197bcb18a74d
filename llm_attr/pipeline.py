"""The featurize skeleton every method shares, and the run-directory contract it keeps.

A featurize command (Daunce, gradients, further training, LDS retraining, black-box Daunce) is always: check
`--out` and the inputs, fingerprint the model, data and config, create or resume the store, copy the inputs under
`OUT/inputs/`, take this process's share of the work items (r, r + P, ...), compute the missing ones, wait for
every process, and let the main process finalize the manifest. `open_store`, `my_share` and `finish` are those
steps; a method supplies its work items and how to compute one.

The run-directory contract (`docs/design.md`):
- the tool writes only the files it owns, under names that cannot collide with a user's files (its copies of the
  inputs live in `OUT/inputs/`), and never a path that is one of its inputs;
- `--out` is a new or empty directory, or a run of the same kind; anything else is refused in one line that names
  what is there, before anything is written;
- a run that stopped before computing anything never blocks the next command (`Store.create`);
- reading a run (score, query, eval, report) never deletes anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import to_dict
from .data.records import Record, as_records, records_fingerprint, save_jsonl
from .errors import RunDirError
from .fingerprints import model_fingerprint, module_fingerprint
from .io import LOCK_PREFIX, fingerprint, run_lock
from .store import INPUTS_DIR, MANIFEST, Store, describe_manifest, input_copy

logger = logging.getLogger(__name__)

#: What marks a folder as the output of an earlier `llm-attr query` (it may be written again).
QUERY_OUTPUTS = ("scorings", "scores.json", "query_signals.safetensors", "query_gradients.safetensors")


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def check_out(out: str | Path, kind: str, inputs: dict[str, Any], *, overwrite: bool = False,
              resumable: Sequence[str] = ()) -> None:
    """Refuse, in one line and before anything is written, an `--out` this command may not write into.

    `inputs`: `{flag: value}` of the command's inputs (paths or in-memory data); each path is resolved and must
    lie outside `out` (the tool writes there, so an input inside it could be replaced). `out` must be missing,
    empty (lock files aside) or a store of the same `kind`; with `overwrite`, a store of any kind (it is replaced),
    never a folder of other files. `resumable`: names whose presence alone marks an unfinished run of this kind
    (a fine-tune killed before its manifest leaves only `checkpoints/`).
    """
    out = Path(out)
    out_resolved = out.resolve()
    for flag, value in inputs.items():
        if not isinstance(value, (str, Path)) or not Path(value).exists():
            continue
        path = Path(value).resolve()
        if path == out_resolved or out_resolved in path.parents:
            raise RunDirError(f"--{flag} {value} lies inside --out {out}, where this command writes its own files; "
                              f"pass --{flag} from outside it, or choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose a new or empty directory")
    entries = [p.name for p in out.iterdir() if not p.name.startswith(LOCK_PREFIX)]
    if not entries:
        return
    manifest = read_manifest(out)
    if manifest and kind in (manifest.get("method"), manifest.get("kind")):
        return
    if manifest and ("store_version" in manifest or manifest.get("kind")) and overwrite:
        return
    if manifest is None and any(name in resumable for name in entries):
        return
    if manifest and ("store_version" in manifest or manifest.get("kind")):
        raise RunDirError(f"--out {out} holds {describe_manifest(manifest)}, not a {kind!r} run; choose another --out, "
                          "or pass --overwrite to replace it")
    raise RunDirError(f"--out {out} is neither empty nor a {kind!r} run (it holds {_listing(entries)}); "
                      "choose a new or empty directory")


def run_fingerprint(method: str, model_fp: str, train: Sequence[Record], query: Sequence[Record],
                    config: dict[str, Any], config_key: str = "config") -> tuple[str, dict[str, str]]:
    """(the run's fingerprint, the fingerprints of its parts: model, train, query, config).

    The parts go into the manifest, so that a refused re-run can say which of them differs.
    """
    parts = {"model": model_fp, "train": records_fingerprint(train), "query": records_fingerprint(query)}
    fp = fingerprint({"method": method, **parts, config_key: config})
    return fp, {**parts, "config": fingerprint(config)}


def open_store(out: str | Path, *, method: str, fingerprint: str, parts: dict[str, str], header: dict[str, Any],
               inputs: dict[str, Any], train: Sequence[Record], query: Sequence[Record], state,
               overwrite: bool = False, outputs: Iterable[str] = ()) -> Store:
    """Check `out` (`check_out`), create or resume its store, and copy the records to `OUT/inputs/`.

    `outputs`: the files and folders beside the store this method writes (its scores, adapters, ...): deleted
    with the store by `overwrite`. `state`: the run context (`is_main_process`, `wait_for_everyone`).
    """
    out = Path(out)
    check_out(out, method, inputs, overwrite=overwrite)
    if overwrite and state.is_main_process and (out / MANIFEST).is_file():
        for name in (*outputs, INPUTS_DIR, "scorings"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    store = Store.create(out, method=method, fingerprint=fingerprint, header={**header, "fingerprints": parts},
                         overwrite=overwrite, is_main=state.is_main_process, barrier=state.wait_for_everyone)
    if state.is_main_process:
        save_jsonl(train, input_copy(out, "train"))
        save_jsonl(query, input_copy(out, "query"))
    return store


def work_summary(what: str, todo: int, mine: int, total: int) -> str:
    """One sentence on what this process will compute, e.g. `computing 30 of its 32 perturbations (2 already
    done; 64 in all)`."""
    done = mine - todo
    if not todo:
        return f"all {mine} of its {what} are already done ({total} in all)"
    extra = f"{done} already done; " if done else ""
    return f"computing {todo} of its {mine} {what} ({extra}{total} in all)"


def my_share(items: Sequence[Any], state) -> list[Any]:
    """This process's work items: r, r + P, r + 2P, ... of `items` (r: its rank, P: the number of processes)."""
    return list(items[state.process_index::state.num_processes])


def todo(store: Store, items: Iterable[Any], name_of: Callable[[Any], str]) -> list[Any]:
    """The items whose shard is not complete (missing, or not matching its checksum: it is recomputed)."""
    return [item for item in items if store.missing([name_of(item)])]


def finish(store: Store, names: Iterable[str], state, what: str, **fields: Any) -> dict[str, Any] | None:
    """Wait for every process; the main one records the complete shards and returns the manifest (others None).

    Raises `RunDirError` ("some `what` are missing") when a shard of `names` is not complete.
    """
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    manifest = store.finalize(list(names), **fields)
    if not manifest["complete"]:
        raise RunDirError(f"{store.root}: some {what} are missing after the run; re-run the same command")
    return manifest


def model_identity(model: Any) -> tuple[Any, str, str]:
    """(model as the method takes it, its spec, its fingerprint) of a spec, a path (`finetune` returns one) or a
    `LoadedModel` in memory (fingerprinted by its values)."""
    model = os.fspath(model) if isinstance(model, os.PathLike) else model
    if isinstance(model, str):
        from .models.loading import canonical_spec

        return model, canonical_spec(model), model_fingerprint(model)
    return model, getattr(model, "spec", "in-memory model"), module_fingerprint(model.model)


def shard_config(config: Any, neutral: Sequence[str], later: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config keys that determine a method's shards (fingerprinted): all but the `neutral` ones, which change
    only how a run is scored or evaluated, so a re-run may change them. `later`: keys added after stores were
    written, left out while they hold the value that computes what those stores hold (so they stay valid)."""
    later = later or {}
    return {k: v for k, v in to_dict(config).items()
            if k not in neutral and not (k in later and v == later[k])}


class FeaturizeMethod:
    """Base of the featurize methods: `Method(config).run(model, train, query, out)` under the run's lock.

    A method passes `name` (its lock and log name) and `config_class` as class keywords, and implements `_run(model, train, query, out,
    overwrite=, score=, top_k=)` with the steps of this module. `computed` lists what this process computed in
    the last run; `scores` the main process's scoring figures.
    """

    name = "featurize"
    config_class: type = object

    def __init_subclass__(cls, *, name: str = "", config_class: type | None = None, **kwargs: Any) -> None:
        """`class Daunce(FeaturizeMethod, name="daunce", config_class=DaunceConfig)`."""
        super().__init_subclass__(**kwargs)
        cls.name = name or cls.name
        cls.config_class = config_class or cls.config_class

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.config_class()
        self.computed: list[Any] = []
        self.scores: dict[str, Any] | None = None

    def _on_shard_written(self, item: Any) -> None:
        """Called after each shard this process writes (a hook for tests and progress reporting)."""

    def run(self, model: Any, train: Any, query: Any, out: str | Path, *, overwrite: bool = False,
            score: bool = True, top_k: int = 10) -> Any:
        """Featurize this process's missing work items into the store `out`, then the main process scores.

        model: a spec (`builtin:tiny`, a model dir, a fine-tuned run dir), a path, or a `LoadedModel` (modified in
        place). train, query: JSONL paths, dataset dirs, or lists of records. Under `accelerate launch` process r
        takes items r, r + P, ...; the result does not depend on P. A re-run resumes; a different model, data or
        config into the same `out` is refused unless `overwrite`.
        """
        from .context import run_context

        with run_lock(out, self.name):
            self.inputs = {"train": train, "query": query, "model": model}  # as given: `check_out` compares paths
            self.context = run_context()
            return self._run(model, as_records(train), as_records(query), Path(out), overwrite=overwrite,
                             score=score, top_k=top_k)

    def _run(self, model: Any, train: Sequence[Record], query: Sequence[Record], out: Path, *, overwrite: bool,
             score: bool, top_k: int) -> Any:
        """The method's steps on the loaded records, under the lock; `self.context` is the run context and
        `self.inputs` the inputs as given."""
        raise NotImplementedError
