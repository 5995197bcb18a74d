"""Atomic file writes (temp file + fsync + rename), run-directory locks, path checks and content fingerprints."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, DiskFullError, ModelError, RunDirError

try:
    import fcntl
except ImportError:  # not POSIX: lock files created with O_EXCL, stale ones found by their pid
    fcntl = None

logger = logging.getLogger(__name__)

#: errno values that mean "no space left": a write that fails with one raises `DiskFullError`.
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the temp file onto `path`: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise DiskFullError(disk_full_message(path, e, kept=True)) from e
        raise


def disk_full_message(path: str | Path, error: OSError, kept: bool = False) -> str:
    """One line: the path, that the disk is full, (`kept`: that the file there is untouched) and what to do."""
    reason = error.strerror or os.strerror(error.errno)
    return (f"{path}: disk full ({reason}); {'the file there was left as it was; ' if kept else ''}"
            "free space and re-run the same command")


def atomic_write_text(path: str | Path, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, _write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fingerprint(obj: Any) -> str:
    """Stable short sha256 of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- run-directory locks

#: Lock files are `OUT/.lock.<rank>`: the ranks of one `accelerate launch` run hold one each.
LOCK_PREFIX = ".lock."
#: What a run directory may hold that a re-run resumes from: a failed run that created the directory keeps it then.
RESUMABLE = ("shards/*.json", "checkpoints/*")

_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth (run() calling score_run())
_held_guard = threading.Lock()


def process_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (env RANK, else LOCAL_RANK), 0 otherwise."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _holder(path: Path) -> dict[str, Any]:
    """The holder record a lock file holds (`{}` if it is empty or being written)."""
    for _ in range(5):
        try:
            info = json.loads(path.read_text() or "{}")
            if isinstance(info, dict) and info:
                return info
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    return {}


def _in_use(out: Path, info: dict[str, Any]) -> RunDirError:
    if not info:
        return RunDirError(f"{out}: in use by another llm-attr process; wait for it or stop it")
    return RunDirError(
        f"{out}: in use by pid {info.get('pid')} on {info.get('host')} ({info.get('command')}), started "
        f"{info.get('started')}; wait for it or stop it"
    )


def _record(what: str) -> bytes:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:200], "what": what,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rank": process_rank()}
    return json.dumps(info).encode()


def _acquire(out: Path, path: Path, what: str) -> int:
    """Open and lock `path`; returns its descriptor. `RunDirError` naming the holder if another process has it."""
    if fcntl is None:
        return _acquire_exclusive(out, path, what)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(out, _holder(path)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we opened it
            break
        os.close(fd)
    else:  # pragma: no cover - ten unlink races in a row
        raise _in_use(out, {})
    stale = _holder(path) if os.fstat(fd).st_size else {}
    if stale:
        logger.info("%s: taking over the lock of pid %s, which is gone", out, stale.get("pid"))
    os.ftruncate(fd, 0)
    os.write(fd, _record(what))
    os.fsync(fd)
    return fd


def _acquire_exclusive(out: Path, path: Path, what: str) -> int:
    """No `fcntl`: create the lock file exclusively; a file whose pid is dead (same host) is taken over."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _holder(path)
            pid = info.get("pid")
            if info and (info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid_alive(pid)):
                raise _in_use(out, info) from None
            logger.info("%s: taking over the stale lock of pid %s, which is gone", out, pid)
            path.unlink(missing_ok=True)
            continue
        os.write(fd, _record(what))
        os.fsync(fd)
        return fd
    raise _in_use(out, _holder(path))


def _removable(out: Path, lock: Path, error: BaseException) -> bool:
    """Whether a failed run may remove the directory it created: empty, or its input refused before any work."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # other ranks may still be writing there
        return False
    if all(p.resolve() == lock for p in out.iterdir()):
        return True
    refused = isinstance(error, (ConfigError, DataError, ModelError))
    return refused and not any(next(out.glob(pattern), None) is not None for pattern in RESUMABLE)


@contextlib.contextmanager
def run_lock(out: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold this rank's lock on run directory `out` (created if needed) for the block; yields `out`.

    A second process on the same directory and rank gets a `RunDirError` naming the holder's pid, host and
    command. The kernel drops the lock of a process that dies, so a stale lock file is taken over. Re-entrant
    within one process. A directory this call created is removed again if the block fails leaving it empty, or
    because its input was refused (config, data or model error) before anything resumable (`RESUMABLE`) was
    written: a refused new run leaves no half-written directory behind.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = (out / f"{LOCK_PREFIX}{process_rank()}").resolve()
    with _held_guard:
        depth = _held.get(path, 0)
        if depth:
            _held[path] = depth + 1
    if depth:
        try:
            yield out
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    fd = _acquire(out, path, what)  # refused: the directory, even if just created, may be the holder's now
    with _held_guard:
        _held[path] = 1
    error: BaseException | None = None
    try:
        yield out
    except BaseException as e:
        error = e
        raise
    finally:
        with _held_guard:
            del _held[path]
        if error is not None and created and _removable(out, path, error):
            logger.debug("%s: removing the directory this failed run created", out)
            shutil.rmtree(out, ignore_errors=True)
        if fcntl is None:
            os.close(fd)
            path.unlink(missing_ok=True)
        else:  # unlink first: a process that opens the path after this finds a new file, never a stale flock
            path.unlink(missing_ok=True)
            os.close(fd)  # releases the flock


def locked(what: str, dir_arg: str = "out") -> Callable:
    """Decorator: run the function under `run_lock` of its argument `dir_arg` (a run directory it writes)."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            out = signature.bind(*args, **kwargs).arguments[dir_arg]
            with run_lock(out, what):
                return fn(*args, **kwargs)

        return wrapper

    return wrap


# ---------------------------------------------------------------------- paths read from manifests


def contained_path(root: str | Path, name: str, where: str, *, as_given: bool = False) -> Path:
    """`root / name` for a `name` read from a manifest or index, checked to stay inside `root`.

    Refuses (`RunDirError` naming `where`: the manifest and field) absolute names, `..` components, and symlinks
    resolving outside `root`. `as_given`: `name` is a path used as it is (absolute, or relative to the working
    directory), so it may be absolute but must still lie inside `root`.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise RunDirError(f"{where}: {name!r} is not a file name")
    p = Path(name)
    if ".." in p.parts or ".." in name.replace("\\", "/").split("/"):
        raise RunDirError(f"{where}: {name!r} leaves the run directory ('..')")
    if p.is_absolute() and not as_given:
        raise RunDirError(f"{where}: {name!r} is an absolute path; names in a run directory are relative to it")
    full = p if as_given else Path(root) / p
    root_resolved, resolved = Path(root).resolve(), full.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise RunDirError(f"{where}: {name!r} resolves to {resolved}, outside {root_resolved} (a symlink?)")
    return full
