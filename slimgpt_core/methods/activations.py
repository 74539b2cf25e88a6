"""Where calibration activations live and what memory a run needs: GPU or (pinned) CPU buffers, the checks
before starting, peak memory, and the shards of a torch.distributed run."""
from __future__ import annotations


import torch
import torch.distributed as dist

from slimgpt_core.base import devices
from slimgpt_core.base.errors import MEMORY_ADVICE, SlimGPTError


def distributed_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_tokens(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's calibration samples: whole micro-batches, round robin, so every micro-batch (and its
    forward pass) is exactly the one a single process would run."""
    rank, world = distributed_rank_world()
    if world == 1:
        return tokens
    batches = [tokens[s:s + batch_size] for s in range(0, tokens.shape[0], batch_size)]
    mine = batches[rank::world]
    if not mine:
        raise SlimGPTError(f"{len(batches)} calibration batches cannot feed {world} processes: lower --batch-size")
    return torch.cat(mine)


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖/‖b‖ over all shards of a distributed run. Norms in fp64 over chunks (whole-buffer fp64 copies
    cost more than the norms)."""
    chunks = [slice(s, s + 16) for s in range(0, a.shape[0], 16)]
    sums = torch.stack([sum(torch.linalg.vector_norm(a[c] - b[c], dtype=torch.float64).square() for c in chunks),
                        sum(torch.linalg.vector_norm(b[c], dtype=torch.float64).square() for c in chunks)])
    if distributed_rank_world()[1] > 1:
        dist.all_reduce(sums)
    return float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30))


def activation_streams(settings) -> tuple[bool, bool]:
    """(dense, pruned): the activation streams a run keeps. The dense stream calibrates dense-input runs and is
    the reference for accumulated error; the pruned stream calibrates sequential runs."""
    return (not settings.sequential or settings.track_accumulation,
            settings.sequential or settings.track_accumulation)


def activation_bytes(model, n_tokens: int, buffers: int) -> int:
    return buffers * n_tokens * model.config.hidden_size * next(model.parameters()).element_size()


def activation_device(model, tokens: torch.Tensor, device: torch.device, mode: str,
                      buffers: int = 4) -> torch.device:
    """Where the calibration activation buffers live: on the GPU when they fit comfortably, else in pinned CPU
    memory (micro-batches are copied to the GPU as each layer runs)."""
    if device.type != "cuda" or mode == "never":
        return device
    if mode == "always":
        return torch.device("cpu")
    fits = devices.fits_in_memory(activation_bytes(model, tokens.numel(), buffers), device, 0.5, below=True)
    return device if fits else torch.device("cpu")


def buffer_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer like x, pinned when x is (fast non-blocking copies to the GPU)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, pin_memory=x.device.type == "cpu" and x.is_pinned())


def place(x: torch.Tensor, act_device: torch.device) -> torch.Tensor:
    if x.device == act_device:
        return x
    if act_device.type == "cpu" and torch.cuda.is_available():
        return x.to("cpu").pin_memory()
    return x.to(act_device)


def check_memory(model, nsamples: int, seqlen: int, device: torch.device, buffers: int = 4) -> None:
    """Refuse before starting when the calibration activation buffers cannot fit."""
    devices.check_free_memory(activation_bytes(model, nsamples * seqlen, buffers), device,
                              "calibration activations need", MEMORY_ADVICE)


def fits(nbytes: int, where: torch.device) -> bool:
    """Whether a buffer kept between passes fits comfortably (a quarter of what is free there)."""
    return devices.fits_in_memory(nbytes, where, 0.25, below=True)
