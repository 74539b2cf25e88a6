"""A model or workspace run exported as a checkpoint folder (and a zip beside it): the run's files copied as they
are when they already are what is asked for, else loaded and re-saved; the card names the run and its measurements."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from slimgpt_core.base.atomic import check_output_folder
from slimgpt_core.base.devices import DTYPES
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.base.shapes import count_parameters, is_heterogeneous
from slimgpt_core.export.archive import ByteProgress, copy_file, stored_float_dtypes
from slimgpt_core.export.checkpoint import (ExportResult, add_remote_code, check_zip_target, export_checkpoint,
                                            model_card, write_folder_and_zip, zip_path_for)
from slimgpt_core.models import load_config, load_model
from slimgpt_core.workspace.store import EVALUATIONS, META, read_evaluations, read_run, runs_root

EXPORTS = "_exports"  # inside the workspace; list_runs skips names starting with "_"
# a run folder's own bookkeeping, not part of an exported checkpoint (the card and remote code are written afresh)
NOT_EXPORTED = {META, EVALUATIONS, "eval.json", "README.md", "modeling_slimgpt.py"}


def default_export_folder(run_name: str) -> Path:
    """Where the studio exports a run unless told otherwise: inside the workspace, never under cache/."""
    return runs_root() / EXPORTS / run_name


def run_identity(folder: Path) -> dict | None:
    """A workspace run's name, label and summary (from meta.json); None for a folder that is not a run."""
    folder = Path(folder)
    if not (folder / META).exists() and not (folder / "report.json").exists():
        return None
    info = read_run(folder)
    return {"name": info.name, "label": info.label, "title": info.title, "summary": info.summary}


def _card_inputs(folder: Path | None) -> tuple:
    """What a source folder says about itself for the card: its report, its measurements, the run it is."""
    if folder is None or not folder.is_dir():
        return None, {}, None
    report = RunReport.load(folder / "report.json") if (folder / "report.json").exists() else None
    evaluation = {}
    if (folder / "eval.json").exists():
        evaluation = _flatten_eval(json.loads((folder / "eval.json").read_text()))
    for record in read_evaluations(folder):  # measurements the studio stored with the run; latest wins
        key = {"perplexity": "perplexity", "task": record.get("task")}.get(record.get("kind"))
        if key:
            evaluation[key] = record
    return report, evaluation, run_identity(folder)


def reusable_files(folder: Path, config, dtype: str) -> bool:
    """Whether the folder's files already are the export asked for: safetensors in the asked dtype ("auto": as
    stored), in a layout this version writes (per-layer shapes under the SlimGPT model type)."""
    if not any(folder.glob("*.safetensors")):
        return False
    if is_heterogeneous(config) and not config.model_type.startswith("slimgpt_"):
        return False  # an early run layout: loading and saving rewrites its config
    return dtype == "auto" or stored_float_dtypes(folder) == {str(DTYPES[dtype]).removeprefix("torch.")}


def _meta_model(config):
    """The model's modules without weights: layer shapes and parameter count for the card, nothing allocated."""

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def export_files(folder: Path, out: str | Path, config, report=None, evaluation: dict | None = None,
                 source: str = "", make_zip: bool = False, overwrite: bool = False, run: dict | None = None,
                 callback: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> ExportResult:
    """Export a model folder whose weights need no change: its files copied byte for byte (never loaded or
    re-saved), a fresh model card and remote code, and a zip that stores them. All or nothing, like
    `export_checkpoint`."""
    folder, out = Path(folder), Path(out)
    zip_path = zip_path_for(out) if make_zip else None
    check_output_folder(out, overwrite)
    if zip_path is not None:
        check_zip_target(zip_path, overwrite)
    model = _meta_model(config)
    hetero = is_heterogeneous(config)
    card = model_card(model, report, evaluation, source, hetero, run)
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name not in NOT_EXPORTED]
    copied = sum(p.stat().st_size for p in files)
    total = copied * (2 if make_zip else 1)
    progress = ByteProgress(total, callback, should_stop)

    def fill(tmp: Path) -> None:
        for path in files:
            copy_file(path, tmp / path.name, progress)
        if hetero:
            add_remote_code(tmp, model, json.loads((folder / "config.json").read_text()))
        (tmp / "README.md").write_text(card)

    stamp = write_folder_and_zip(out, zip_path, overwrite, fill, lambda tmp: progress)
    return ExportResult(out, zip_path, hetero, count_parameters(model), sorted(p.name for p in out.iterdir()),
                        source=(run or {}).get("name", source), source_folder=folder,
                        title=(run or {}).get("title", source), card=card, reused_weights=True, zip_stamp=stamp)


def check_replaceable(out: str | Path, source_folder: Path | None = None) -> None:
    """An export may replace an earlier export, never anything else: not the folder it exports (or one holding
    it), not a workspace run, not a folder with subfolders (a checkpoint is flat)."""
    out = Path(out).expanduser()
    if not str(out).strip() or not out.name:
        raise SlimGPTError("give a folder to export into")
    resolved = out.resolve()
    if source_folder is not None and (resolved == source_folder.resolve() or resolved in source_folder.resolve().parents
                                      or source_folder.resolve() in resolved.parents):
        raise SlimGPTError(f"{out} is the folder being exported, holds it or lies inside it: choose another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / META).exists() or any(p.is_dir() for p in out.iterdir()) or not (out / "config.json").exists():
        raise SlimGPTError(f"{out} exists and is not an earlier export (a workspace run, a folder with subfolders "
                           "or without config.json): choose another folder")


def export_model(source: str, out: str | Path, make_zip: bool = False, overwrite: bool = False,
                 dtype: str = "auto", callback: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None, reuse_files: bool = True) -> ExportResult:
    """Write a model or run folder as a checkpoint folder (and optionally a zip beside it).

    dtype "auto" keeps the stored dtype. When the weights on disk already are what is asked for, their files are
    copied as they are; only a dtype change (or a model that is not a local folder) loads and re-saves the weights.
    `reuse_files=False` forces the load-and-save path (to compare the two)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise SlimGPTError(f"unknown dtype {dtype!r} (auto, float32, float16, bfloat16)")
    config, where = load_config(source)
    folder = Path(where) if Path(where).is_dir() else None
    check_replaceable(out, folder)
    report, evaluation, run = _card_inputs(folder)
    if reuse_files and folder is not None and reusable_files(folder, config, dtype):
        return export_files(folder, out, config, report, evaluation, source, make_zip, overwrite, run,
                            callback, should_stop)
    if dtype == "auto" and folder is not None and len(stored := stored_float_dtypes(folder)) == 1:
        dtype = stored.pop()  # "auto" means as stored, not the CPU's float32
    loaded = load_model(source, "cpu", dtype)
    result = export_checkpoint(loaded.model, loaded.tokenizer, out, report, evaluation, source, make_zip, overwrite,
                               run=run, callback=callback, should_stop=should_stop)
    result.source_folder = folder
    return result


def _flatten_eval(payload: dict) -> dict:
    flat = {}
    if "perplexity" in payload:
        flat["perplexity"] = payload["perplexity"]
    for task, res in (payload.get("tasks") or {}).items():
        flat[task] = res
    return flat
