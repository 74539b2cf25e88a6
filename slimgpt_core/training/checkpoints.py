"""Checkpoints a killed training run resumes from: every K steps, in `<folder>/step-<n>/`,

- the trainable weights and the optimizer state as a torch.distributed.checkpoint (DCP) checkpoint, each rank
  writing its own shards (with FSDP2 nobody gathers the model for it);
- `state.json` (rank 0): the step, the scheduler, the data stream's position (and domain weights), the loss
  curve so far and what the caller adds (dynamic batch loading's mix history);
- `rng-<rank>.safetensors`: each rank's random-number generator states (dropout draws differ per rank).

`<folder>/latest` names the last complete checkpoint; it is rewritten (atomically) only after every rank has
written its part, so a run killed while writing resumes from the one before. Older checkpoints are removed.
DCP's own `.metadata` file is a pickle written by PyTorch; these checkpoints are for resuming only, never shipped
(the finished model is saved as safetensors).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.training.distributed import rank_world

TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)  # LoRA: the adapters only (frozen weights stay)


@dataclass
class CheckpointPlan:
    folder: str | Path
    every: int = 0  # 0: never written
    resume: bool = False  # continue from `folder/latest` when there is one
    extra_state: Callable[[], dict] | None = None  # the caller's JSON-able state, saved beside the loop's
    restore_extra: Callable[[dict], None] | None = None


def _barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(plan: CheckpointPlan, step: int, model, optimizer, state: dict) -> Path:
    """Every rank calls this at the same step; returns the checkpoint's folder."""
    rank, _ = rank_world()
    folder = Path(plan.folder) / f"step-{step:07d}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    _barrier()
    tensors = {"model": get_model_state_dict(model, options=TRAINABLE),
               "optim": get_optimizer_state_dict(model, optimizer, options=TRAINABLE)}
    dcp.save(tensors, checkpoint_id=folder)
    save_file(_rng_state(), str(folder / f"rng-{rank}.safetensors"))
    if rank == 0:
        extra = plan.extra_state() if plan.extra_state else {}
        _write_text(folder / "state.json", json.dumps({**state, "step": step, "extra": extra}))
    _barrier()  # every rank's shards are on disk before `latest` names them
    if rank == 0:
        _write_text(Path(plan.folder) / "latest", folder.name)
        for old in Path(plan.folder).glob("step-*"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(folder: str | Path) -> Path | None:
    pointer = Path(folder) / "latest"
    return Path(folder) / pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None


def load_checkpoint(plan: CheckpointPlan, model, optimizer) -> dict | None:
    """Weights, optimizer and RNG restored in place from the latest checkpoint; its state.json (None: none yet)."""
    folder = latest_checkpoint(plan.folder)
    if folder is None:
        return None
    rank, world = rank_world()
    rng_file = folder / f"rng-{rank}.safetensors"
    if not rng_file.exists():
        raise SlimGPTError(f"checkpoint {folder} was written by fewer processes than the {world} resuming it "
                           "(resume with the same --nproc-per-node)")
    tensors = {"model": get_model_state_dict(model, options=TRAINABLE),
               "optim": get_optimizer_state_dict(model, optimizer, options=TRAINABLE)}
    dcp.load(tensors, checkpoint_id=folder)
    set_model_state_dict(model, tensors["model"], options=TRAINABLE)
    set_optimizer_state_dict(model, optimizer, tensors["optim"], options=TRAINABLE)
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if plan.restore_extra:
        plan.restore_extra(state["extra"])
    return state
