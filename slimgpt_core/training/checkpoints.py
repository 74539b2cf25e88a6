"""Checkpoints a killed training run resumes from: every K steps, in `<folder>/step-<n>/`,

- the trainable weights and the optimizer state as a torch.distributed.checkpoint (DCP) checkpoint, each rank
  writing its own shards (with FSDP2 nobody gathers the model for it); besides the model, other modules with
  their optimizers (shear's masks and multipliers, the same on every rank: DCP writes such replicated tensors
  once) and loose tensors (a generator's state);
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


Parts = dict[str, tuple[torch.nn.Module, list[torch.optim.Optimizer]]]  # name -> (module, its optimizers)


def _tensor_state(parts: Parts, loose: dict[str, torch.Tensor] | None) -> dict:
    """What DCP writes: each part's trainable weights and its optimizers' state, and the loose tensors."""
    out = {}
    for name, (module, optimizers) in parts.items():
        out[name] = get_model_state_dict(module, options=TRAINABLE)
        if optimizers:
            out[f"{name}-optim"] = get_optimizer_state_dict(module, optimizers, options=TRAINABLE)
    return {**out, **(loose or {})}


def _parts(model, optimizer, others: Parts | None) -> Parts:
    return {"model": (model, [optimizer] if optimizer is not None else []), **(others or {})}


def save_checkpoint(plan: CheckpointPlan, step: int, model, optimizer, state: dict, others: Parts | None = None,
                    loose: dict[str, torch.Tensor] | None = None) -> Path:
    """Every rank calls this at the same step; returns the checkpoint's folder. `others`: more modules with
    their optimizers (name -> (module, optimizers)); `loose`: plain tensors restored in place by load_checkpoint."""
    rank, _ = rank_world()
    folder = Path(plan.folder) / f"step-{step:07d}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(_tensor_state(_parts(model, optimizer, others), loose), checkpoint_id=folder)
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


def load_checkpoint(plan: CheckpointPlan, model, optimizer, others: Parts | None = None,
                    loose: dict[str, torch.Tensor] | None = None) -> dict | None:
    """Weights, optimizers, loose tensors and RNG restored in place from the latest checkpoint (the same `others`
    and `loose` names as saved); its state.json (None: none yet)."""
    folder = latest_checkpoint(plan.folder)
    if folder is None:
        return None
    rank, world = rank_world()
    rng_file = folder / f"rng-{rank}.safetensors"
    if not rng_file.exists():
        raise SlimGPTError(f"checkpoint {folder} was written by fewer processes than the {world} resuming it "
                           "(resume with the same --nproc-per-node)")
    parts = _parts(model, optimizer, others)
    tensors = _tensor_state(parts, loose)
    dcp.load(tensors, checkpoint_id=folder)
    for name, (module, optimizers) in parts.items():
        set_model_state_dict(module, tensors[name], options=TRAINABLE)
        if optimizers:
            set_optimizer_state_dict(module, optimizers, tensors[f"{name}-optim"], options=TRAINABLE)
    for name, tensor in (loose or {}).items():
        tensor.copy_(tensors[name])  # DCP loads in place; a safeguard should it hand back a new tensor
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if plan.restore_extra:
        plan.restore_extra(state["extra"])
    return state
