"""Fingerprints of a run's inputs: a model named by a spec (its files), or a model in memory (its values).

A store records the fingerprint of its model, data and config, and refuses to mix shards of two different ones;
these are the model's part of it. Files are hashed in full up to 256 MiB, larger ones by size and both ends.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .io import file_fingerprint, fingerprint


def _weights_fingerprint(folder: Path) -> list[Any]:
    """(name, size, sha256 prefix) of a model directory's config and weight files; big files by size + ends."""
    out: list[Any] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not p.name.endswith((".json", ".safetensors", ".bin", ".gguf", ".pt")):
            continue
        size = p.stat().st_size
        if size <= 256 << 20:
            out.append([p.name, size, file_fingerprint(p)])
        else:  # hashing many GB each run is too slow: size plus the first and last MiB
            h = hashlib.sha256()
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
            out.append([p.name, size, h.hexdigest()[:16]])
    return out


def model_fingerprint(spec: str | os.PathLike) -> str:
    """Fingerprint of the model a spec names: an adapter's weights (a run directory's, a peft adapter folder's, a
    checkpoint's), recursively its base."""
    from .models.loading import adapter_of, base_model, resolve_plain

    spec = os.fspath(spec)
    adapter = adapter_of(spec)
    if adapter is not None:
        base, folder = adapter
        with base_model(None):
            return fingerprint({"run": _weights_fingerprint(folder), "base": model_fingerprint(base)})
    try:
        path, _ = resolve_plain(spec)
    except Exception:
        return fingerprint({"spec": spec})
    folder = Path(path)
    if folder.is_dir():
        return fingerprint({"dir": _weights_fingerprint(folder)})
    return fingerprint({"spec": spec})  # hub id: the id is all we know without a download


def module_fingerprint(model: torch.nn.Module, max_elements: int = 1 << 16) -> str:
    """Fingerprint of an in-memory model: names, shapes, dtypes and a strided sample of every parameter's values."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // max_elements)
        sample = flat[::step].float().cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample)
    return h.hexdigest()[:16]
