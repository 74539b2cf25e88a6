"""A pruning run on disk: the pruned model (safetensors + config with per-layer shapes), tokenizer, report.json.

Written into a temporary folder beside `out` and renamed at the end, so a failure leaves nothing."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import SlimGPTError
from .events import PruneReport


def check_output_folder(out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SlimGPTError(f"output folder {out} already exists and is not empty (choose another --out or pass --force)")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlimGPTError(f"cannot create the output folder's parent {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise SlimGPTError(f"cannot write into {parent}")
    return out


def save_run(model, tokenizer, report: PruneReport, out: str | Path, overwrite: bool = False) -> Path:
    out = check_output_folder(out, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report.save(tmp / "report.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise SlimGPTError(f"could not write the run to {out}: {exc.strerror or exc} (disk full?); nothing was kept") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
