"""Content-addressed cache under cache/ (see cache/README.md).

Every entry is one file named by a hash of its key and written to a unique temporary name, then renamed:
concurrent writers never see or leave half an entry. An entry that does not read back (truncated, corrupt,
written for another key) is deleted and recomputed. `STATS` counts hits and misses per kind (tests assert on it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import torch

from slimgpt_core.base.assets import cache_root

KINDS = ("models", "tokens", "stats", "results")
STATS: Counter = Counter()
# model_fingerprint: weights up to this many bytes are hashed in full; beyond, each tensor over SAMPLED_TENSOR_BYTES
# contributes about SAMPLES_PER_TENSOR strided bytes (hashing 14 GB byte by byte would take minutes)
FULL_HASH_BYTES = 2**31
SAMPLED_TENSOR_BYTES = 2**22
SAMPLES_PER_TENSOR = 2**20


def _path(kind: str, key: str, suffix: str) -> Path:
    folder = cache_root() / kind
    folder.mkdir(exist_ok=True)  # cache_root() made the root
    return folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + suffix)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written is only slower
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lookup_tensors(kind: str, key: str) -> dict[str, torch.Tensor] | None:
    """The stored tensors, or None when absent or unreadable (a bad entry is deleted)."""

    path = _path(kind, key, ".safetensors")
    if not path.exists():
        STATS[f"{kind}.miss"] += 1
        return None
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                STATS[f"{kind}.hit"] += 1  # counted once read: a bad entry is only "corrupt"
                return tensors
    except Exception:  # truncated or corrupt: recompute
        pass
    path.unlink(missing_ok=True)
    STATS[f"{kind}.corrupt"] += 1
    return None


def store_tensors(kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
    _atomic_write(_path(kind, key, ".safetensors"),
                  lambda tmp: safetensors.torch.save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                                        metadata={"key": key}))


def get_tensors(kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tensors = lookup_tensors(kind, key)
    if tensors is None:
        tensors = compute()
        store_tensors(kind, key, tensors)
    return tensors


def lookup_json(kind: str, key: str):
    """The stored value, or None when absent or unreadable (a bad entry is deleted)."""
    path = _path(kind, key, ".json")
    if not path.exists():
        STATS[f"{kind}.miss"] += 1
        return None
    try:
        payload = json.loads(path.read_text())
        if payload.get("key") == key:
            value = payload["value"]
            STATS[f"{kind}.hit"] += 1  # counted once read: a bad entry is only "corrupt"
            return value
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    path.unlink(missing_ok=True)
    STATS[f"{kind}.corrupt"] += 1
    return None


def store_json(kind: str, key: str, value) -> None:
    path = _path(kind, key, ".json")
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"key": key, "value": value})))


def model_fingerprint(model) -> str:
    """Hash of the config and the weights (every byte up to 2 GB of weights, strided samples beyond)."""
    cached = getattr(model, "_slimgpt_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        raw = t.view(-1).view(torch.uint8)
        if total > FULL_HASH_BYTES and raw.numel() > SAMPLED_TENSOR_BYTES:
            raw = raw[:: raw.numel() // SAMPLES_PER_TENSOR]
        h.update(raw.numpy().tobytes())
    fp = h.hexdigest()
    model._slimgpt_fingerprint = fp
    return fp


def forget_fingerprint(model) -> None:
    """Call after changing weights in place."""
    model._slimgpt_fingerprint = None


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.blake2b(tokens.contiguous().cpu().numpy().tobytes(), digest_size=12).hexdigest() + \
        f"{tuple(tokens.shape)}"


def info() -> dict[str, dict]:
    root = cache_root()
    out = {}
    for kind in KINDS:
        folder = root / kind
        files = [p for p in folder.rglob("*") if p.is_file()]  # none when the folder does not exist
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.exists() else []
        out[kind] = {"entries": len(entries), "bytes": sum(p.stat().st_size for p in files)}
    out["root"] = {"path": str(root)}
    return out


def clear(kind: str | None = None) -> int:
    """Delete all entries (or one kind); cache/README.md stays. Returns bytes freed."""
    root = cache_root()
    freed = 0
    for k in ([kind] if kind else KINDS):
        folder = root / k
        if folder.exists():
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
    return freed
