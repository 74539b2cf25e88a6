"""A shear run end to end, as the command line and the studio call it: data, memory check, masks, cut, save."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from slimgpt_core import data
from slimgpt_core.base import devices
from slimgpt_core.base.atomic import atomic_folder
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.export.checkpoint import write_checkpoint
from slimgpt_core.methods.shear.target import Shape
from slimgpt_core.methods.shear.train import ShearResult, ShearStep
from slimgpt_core.training.loop import training_bytes

ABBREV = {"layers": "L", "kv_groups": "kv", "heads_per_group": "q/g", "ffn": "ffn", "hidden": "d"}


def describe_step(e: ShearStep) -> str:
    """One progress line: loss, each structure's expected size / target, λ₁ summed, tokens/s, ETA."""
    sizes = " ".join(f"{ABBREV[k]} {e.expected[k]:.1f}/{e.target[k]:.1f}" for k in ABBREV)
    lam = " ".join(f"{k}:{v[0]:+.1f},{v[1]:.1f}" for k, v in e.lambdas.items())
    return (f"step {e.step}/{e.steps} loss {e.loss:.3f} | {sizes} | λ {lam} | {e.tokens_per_s:.0f} tok/s "
            f"ETA {e.eta_s:.0f}s")


def training_tokens(tokenizer, sources: list[str], steps: int, batch_size: int, seqlen: int,
                    seed: int = 0) -> torch.Tensor:
    """Enough windows for `steps` micro-batches, an equal share from each source (a static mix)."""

    if not sources:
        raise SlimGPTError("give at least one data source (--data c4,tinystories)")
    per_source = min(4096, math.ceil(steps * batch_size / len(sources)))
    return torch.cat([data.calibration_tokens(tokenizer, s, per_source, seqlen, seed) for s in sources])


def check_training_memory(model, batch_size: int, seqlen: int, device: torch.device, train_weights: bool) -> None:
    devices.check_free_memory(training_bytes(model, batch_size, seqlen, train_weights), device,
                              "mask learning needs about", "lower --batch-size or --seqlen, or pass --freeze-weights")


def save_shear_run(model, tokenizer, result: ShearResult, out: str | Path, overwrite: bool = False) -> Path:
    """The checkpoint and report.json like every run, plus shear.json: the step-by-step history."""

    out = Path(out)
    with atomic_folder(out, overwrite) as tmp:
        write_checkpoint(model, tokenizer, tmp, result.report)
        result.report.save(tmp / "report.json")
        (tmp / "shear.json").write_text(json.dumps(
            {"source": result.source.to_dict(), "target": result.target.to_dict(), "kept_layers": result.kept_layers,
             "history": [asdict(e) for e in result.history]}, indent=1))
    return out


def target_summary(target: Shape, source: Shape) -> dict:
    return {k: f"{getattr(source, k)}->{getattr(target, k)}" for k in ("layers", "kv_groups", "heads", "ffn", "hidden")}
