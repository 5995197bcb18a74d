"""The sharded, resumable store every featurize phase writes: a `manifest.json` plus one safetensors file per shard.

Layout of a store directory:

    manifest.json              method, fingerprint, config, model, ids, shapes, dtype, complete shards + sha256
    inputs/{train,query}.jsonl the tool's copies of the records it was given
    shards/NAME.safetensors    the tensors of one shard (Daunce: one perturbation; gradients: a block of rows)
    shards/NAME.json           its sidecar: sha256 of the .safetensors file, tensor shapes, free-form meta

Both files of a shard are written atomically (temp file + rename), the sidecar last: a shard is complete only when
its sidecar exists and the checksum of its file matches. A process writes only the shards it computed, so several
processes (`accelerate launch`) never write the same file; the main process refreshes the manifest's shard list
(`Store.finalize`). A corrupted or torn shard is logged and reported missing, never read, and never deleted by
a reader: the command that writes it replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import RunDirError
from .faults import fault_point
from .io import atomic_write, atomic_write_json, contained_path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
STORE_VERSION = 1


#: The folder of a run directory that holds the tool's copies of its inputs (train.jsonl, query.jsonl): names that
#: cannot collide with the user's own files.
INPUTS_DIR = "inputs"


def input_copy(run: str | Path, side: str) -> Path:
    """Where a run keeps its copy of the `side` ("train" or "query") records: `RUN/inputs/<side>.jsonl`."""
    return Path(run) / INPUTS_DIR / f"{side}.jsonl"


def run_input(run: str | Path, side: str) -> Path | None:
    """The run's copy of its `side` records (`RUN/inputs/<side>.jsonl`, or `RUN/<side>.jsonl` in a run written
    before the copies moved there), or None if it has none."""
    for path in (input_copy(run, side), Path(run) / f"{side}.jsonl"):
        if path.is_file():
            return path
    return None


class ShardError(RunDirError):
    """A shard is missing, or its file does not match the checksum recorded when it was written."""


def valid_shard_name(name: Any) -> bool:
    """Shard names are plain file-name stems: letters, digits, '_', '.', '-', not starting with '.'."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and all(
        c.isalnum() or c in "_.-" for c in name)


def sha256_file(path: str | Path) -> str:
    """Full hex sha256 of a file, read in 1 MiB blocks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Store:
    """A store directory. Create (or re-open to resume) with `Store.create`; open a finished one with `Store.open`.

    Shard names are plain strings (`[A-Za-z0-9_.-]`); tensors are any `{name: tensor}` (moved to CPU, contiguous).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._verified: dict[str, tuple[int, int, str]] = {}  # name -> (size, mtime_ns, sha256) checked this process

    # ------------------------------------------------------------------ creation / identity

    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        method: str,
        fingerprint: str,
        header: dict[str, Any],
        overwrite: bool = False,
        is_main: bool = True,
        barrier: Callable[[], None] | None = None,
    ) -> Store:
        """Open `root` for writing: a new store, or the resumable one already there with the same `fingerprint`.

        `header` (config, model, ids, shapes, dtype...) goes into the manifest. A store of another method or
        fingerprint raises `RunDirError` unless `overwrite` (then its shards are deleted). With several processes
        every one calls this (each checks; the main one writes; `barrier` separates the two).
        """
        store = cls(root)
        existing = store.read_manifest()
        restart = existing is not None and not overwrite and store._computed_nothing(existing, method)
        if existing is not None and not overwrite and not restart:
            store._check_identity(existing, method, fingerprint)
        if barrier is not None:
            barrier()
        if is_main:
            if restart and existing.get("fingerprint") != fingerprint:
                logger.info("%s: the %s run there stopped before computing anything; starting it again with this "
                            "command's model, data and config", store.root, method)
                (store.root / MANIFEST).unlink(missing_ok=True)
                existing = None
            if existing is not None and overwrite:
                logger.warning("%s: --overwrite: deleting %s there", store.root, describe_manifest(existing))
                shutil.rmtree(store.root / SHARD_DIR, ignore_errors=True)
                (store.root / MANIFEST).unlink(missing_ok=True)
                existing = None
            manifest = dict(existing or {})
            manifest.update(header)
            manifest.update({"store_version": STORE_VERSION, "method": method, "fingerprint": fingerprint})
            manifest.setdefault("complete", False)
            manifest.setdefault("shards", {})
            (store.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            for torn in (store.root / SHARD_DIR).glob(".*.tmp"):  # half-written by a killed run: never read
                logger.info("removing %s, a shard a killed run did not finish writing", torn)
                torn.unlink(missing_ok=True)
            atomic_write_json(store.root / MANIFEST, manifest)
        if barrier is not None:
            barrier()
        return store

    @classmethod
    def open(cls, root: str | Path, method: str | None = None) -> Store:
        """Open an existing store for reading; `RunDirError` if there is none (or it is of another `method`)."""
        store = cls(root)
        manifest = store.read_manifest()
        if manifest is None or "store_version" not in manifest:
            raise RunDirError(f"{store.root}: not a store directory (no {MANIFEST} written by a featurize command)")
        if method is not None and manifest.get("method") != method:
            raise RunDirError(f"{store.root}: holds {describe_manifest(manifest)}, not {method!r}")
        return store

    def _computed_nothing(self, old: dict[str, Any], method: str) -> bool:
        """Whether `old` is a store of `method` that holds no shard and no submitted job: nothing to lose."""
        if old.get("method") != method or "store_version" not in old:
            return False
        if any(entry.get("job_id") for entry in (old.get("jobs") or {}).values() if isinstance(entry, dict)):
            return False
        return next((self.root / SHARD_DIR).glob("*.json"), None) is None

    def _check_identity(self, old: dict[str, Any], method: str, fp: str) -> None:
        if old.get("method") != method:
            raise RunDirError(f"{self.root}: already holds {describe_manifest(old)}, not a {method!r} store; choose "
                              "another --out, or pass --overwrite to delete it")
        if old.get("fingerprint") != fp:
            raise RunDirError(
                f"{self.root}: already holds a {method!r} run with a different model, data or config; its shards "
                "cannot be mixed with this run's. Choose another --out, or pass --overwrite to delete it"
            )

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(manifest, dict):
            raise RunDirError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
        for name in manifest.get("shards") or {}:  # names from a file: never trusted to stay inside the store
            if not valid_shard_name(name):
                raise RunDirError(f"{path}: field 'shards' names {name!r}, not a shard name (letters, digits, "
                                  "'_', '.', '-'; no path)")
        return manifest

    @property
    def manifest(self) -> dict[str, Any]:
        manifest = self.read_manifest()
        if manifest is None:
            raise RunDirError(f"{self.root}: no {MANIFEST}")
        return manifest

    def update_manifest(self, **fields: Any) -> None:
        """Set top-level manifest fields (main process only)."""
        manifest = self.manifest
        manifest.update(fields)
        atomic_write_json(self.root / MANIFEST, manifest)

    # ------------------------------------------------------------------ shards

    def shard_path(self, name: str) -> Path:
        return self.root / SHARD_DIR / f"{name}.safetensors"

    def _sidecar_path(self, name: str) -> Path:
        return self.root / SHARD_DIR / f"{name}.json"

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> str:
        """Write one shard atomically (file, then sidecar with its sha256); returns the sha256."""
        from safetensors.torch import save_file

        if not valid_shard_name(name):
            raise ValueError(f"shard name {name!r}: use letters, digits, '_', '.', '-'")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = self.shard_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sidecar_path(name).unlink(missing_ok=True)  # an old sidecar never vouches for a new file
        def _write(tmp: str) -> None:
            save_file(tensors, tmp)
            fault_point("shard_write")

        atomic_write(path, _write)
        digest = sha256_file(path)
        sidecar = {
            "name": name,
            "sha256": digest,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in tensors.items()},
            "meta": meta or {},
        }
        atomic_write_json(self._sidecar_path(name), sidecar)
        stat = path.stat()
        self._verified[name] = (stat.st_size, stat.st_mtime_ns, digest)
        fault_point("shard_done")
        return digest

    def shard_info(self, name: str) -> dict[str, Any] | None:
        """The sidecar of shard `name` (sha256, tensor shapes, meta), or None if it has none."""
        path = self._sidecar_path(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def is_complete(self, name: str, verify: bool = True) -> bool:
        """True iff shard `name` has a sidecar and (with `verify`) its file's sha256 matches it."""
        info = self.shard_info(name)
        path = self.shard_path(name)
        if info is None or not path.is_file():
            return False
        if not verify:
            return True
        stat = path.stat()
        cached = self._verified.get(name)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns) and cached[2] == info["sha256"]:
            return True
        digest = sha256_file(path)
        if digest != info["sha256"]:
            return False
        self._verified[name] = (stat.st_size, stat.st_mtime_ns, digest)
        return True

    def missing(self, names: Iterable[str], verify: bool = True) -> list[str]:
        """The shards of `names` not complete yet; corrupted ones (checksum mismatch) are logged and reported
        missing. Nothing is deleted: the command that writes a shard replaces a corrupted one atomically."""
        out = []
        for name in names:
            if self.is_complete(name, verify=verify):
                continue
            if self.shard_info(name) is not None and self.shard_path(name).is_file():
                logger.warning("%s: shard %s does not match its checksum (corrupted or torn); it counts as missing "
                               "and is recomputed by the command that writes it", self.root, name)
                self._verified.pop(name, None)
            out.append(name)
        return out

    def complete_shards(self, verify: bool = True) -> list[str]:
        """Names of all complete shards, sorted."""
        names = sorted(p.stem for p in (self.root / SHARD_DIR).glob("*.json"))
        return [n for n in names if self.is_complete(n, verify=verify)]

    def _checked_path(self, name: str, verify: bool) -> Path:
        if not valid_shard_name(name):
            raise ShardError(f"{self.root}: {name!r} is not a shard name")
        for path in (self.shard_path(name), self._sidecar_path(name)):  # a symlink out of the store is refused
            contained_path(self.root, str(path.relative_to(self.root)), f"{self.root}: shard {name}")
        if self.shard_info(name) is None or not self.shard_path(name).is_file():
            raise ShardError(f"{self.root}: shard {name} is missing; re-run the command that writes it")
        if verify and not self.is_complete(name, verify=True):
            raise ShardError(
                f"{self.root}: shard {name} does not match its checksum (corrupted); re-run the command that "
                "wrote it to recompute it"
            )
        return self.shard_path(name)

    def read_shard(self, name: str, verify: bool = True) -> dict[str, torch.Tensor]:
        """All tensors of shard `name` (checksum verified first, once per process)."""
        from safetensors.torch import load_file

        return load_file(self._checked_path(name, verify))

    def read_slice(self, name: str, key: str, start: int, stop: int, verify: bool = True) -> torch.Tensor:
        """Rows `start:stop` (first dimension) of tensor `key` of shard `name`, read lazily from disk."""
        from safetensors import safe_open

        with safe_open(str(self._checked_path(name, verify)), framework="pt") as f:
            return f.get_slice(key)[start:stop]

    def read_columns(self, name: str, key: str, start: int, stop: int, verify: bool = True) -> torch.Tensor:
        """Columns `start:stop` (last dimension) of the 2-D tensor `key` of shard `name`, read lazily from disk."""
        from safetensors import safe_open

        with safe_open(str(self._checked_path(name, verify)), framework="pt") as f:
            return f.get_slice(key)[:, start:stop]

    def finalize(self, names: Iterable[str] | None = None, **fields: Any) -> dict[str, Any]:
        """Main process: record the complete shards (`names`, default all) with their sha256 in the manifest.

        Sets `complete` to True when every name in `names` is complete; other `fields` are set too.
        """
        wanted = list(names) if names is not None else self.complete_shards()
        missing = self.missing(wanted)
        shards = {n: self.shard_info(n)["sha256"] for n in self.complete_shards()}
        manifest = self.manifest
        manifest.update(fields)
        manifest["shards"] = shards
        manifest["complete"] = not missing
        atomic_write_json(self.root / MANIFEST, manifest)
        return manifest


def describe_manifest(manifest: dict[str, Any]) -> str:
    """What a manifest says is there, in words (never "None" or "unknown")."""
    if manifest.get("method"):
        return f"a {manifest['method']!r} store"
    if manifest.get("kind"):
        return f"a {manifest['kind']!r} run"
    if not manifest:
        return "an unreadable or empty manifest.json"
    return "a manifest.json not written by a featurize command"
