"""Devices, dtypes and memory: which device a name means, how much memory is free there, the peak used."""
from __future__ import annotations

import resource

import torch

from slimgpt_core.base.errors import SlimGPTError

MEMINFO = "/proc/meminfo"  # Linux; elsewhere the CPU's free memory is unknown (None)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimGPTError(f"device {device} asked for, but CUDA is not available here (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SlimGPTError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SlimGPTError(f"unknown dtype {dtype!r} (auto, float32, float16, bfloat16)")
    return DTYPES[dtype]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _fits(need: int, have: int | None, share: float, below: bool) -> bool:
    return have is None or (need < share * have if below else need <= share * have)


def fits_in_memory(need: int, device: torch.device, share: float = 0.9, below: bool = False) -> bool:
    """The one comparison of a planned size with free memory: whether `need` bytes are at most (`below`: under)
    `share` of what is free on `device`. Free memory unknown: they are taken to fit."""
    return _fits(need, available_memory_bytes(device), share, below)


def check_free_memory(need: int, device: torch.device, needs: str, advice: str) -> None:
    """Refuse before any work when `need` bytes exceed nine tenths of what is free on `device` (unknown: go on):
    "{needs} N GiB but DEVICE has M GiB free: {advice}"."""
    have = available_memory_bytes(device)
    if not _fits(need, have, 0.9, below=False):
        raise SlimGPTError(f"{needs} {need / 2**30:.1f} GiB but {device} has {have / 2**30:.1f} GiB free: {advice}")
