"""Checkpoints that load anywhere (SPEC §4): safetensors shards, config, tokenizer, model card.

Layers of one shape: a stock checkpoint. Layers of different shapes: the config carries per-layer lists and an
`auto_map` to `modeling_slimgpt.py`, shipped alongside (`trust_remote_code=True` to load)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from slimgpt_core.errors import SlimGPTError
from slimgpt_core.events import PruneReport
from slimgpt_core.export import modeling_slimgpt
from slimgpt_core.export.archive import ByteProgress, copy_file, stored_float_dtypes, write_zip
from slimgpt_core.models import DTYPES, load_config, load_model
from slimgpt_core.methods.surgery import LAYER_KEYS, base_model_type, count_parameters, describe_layers, is_heterogeneous
from slimgpt_core.workspace.atomic import atomic_folder, check_output_folder
from slimgpt_core.workspace.store import EVALUATIONS, META, read_evaluations, read_run, runs_root

MAX_SHARD = "2GB"
EXPORTS = "_exports"  # inside the workspace; list_runs skips names starting with "_"
# a run folder's own bookkeeping, not part of an exported checkpoint (the card and remote code are written afresh)
NOT_EXPORTED = {META, EVALUATIONS, "eval.json", "README.md", "modeling_slimgpt.py"}


@dataclass
class ExportResult:
    folder: Path
    zip_path: Path | None
    heterogeneous: bool
    parameters: int
    files: list[str]
    source: str = ""  # the run's folder name (or the model) that was exported
    source_folder: Path | None = None  # the folder it was exported from
    title: str = ""  # how the studio names that run: "label (name)"
    card: str = ""  # the model card written into the folder
    reused_weights: bool = False  # the weight files were copied byte for byte (no load, no re-save)
    zip_stamp: tuple[int, int] | None = None  # the zip's (size, mtime_ns) as written: a later export over it differs

    def zip_is_current(self) -> bool:
        """The zip on disk is still the one this export wrote."""
        try:
            stat = self.zip_path.stat()
        except (OSError, AttributeError):
            return False
        return (stat.st_size, stat.st_mtime_ns) == self.zip_stamp


def default_export_folder(run_name: str) -> Path:
    """Where the studio exports a run unless told otherwise: inside the workspace, never under cache/."""
    return runs_root() / EXPORTS / run_name


def zip_path_for(folder: str | Path) -> Path:
    """`FOLDER.zip` beside the folder (a run name like `x-0.5` keeps its dot: not `with_suffix`)."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".zip")


def write_checkpoint(model, tokenizer, folder: Path, report=None, evaluation: dict | None = None,
                     source: str = "", run: dict | None = None) -> bool:
    """Write the model into an existing empty folder; returns whether remote code was needed."""
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=MAX_SHARD)
    tokenizer.save_pretrained(folder)
    hetero = is_heterogeneous(model.config)
    if hetero:
        _add_remote_code(folder, model, json.loads((folder / "config.json").read_text()))
    (folder / "README.md").write_text(model_card(model, report, evaluation, source, hetero, run))
    return hetero


def _add_remote_code(folder: Path, model, config: dict) -> None:
    """Per-layer shapes: config.json points `auto_map` at modeling_slimgpt.py, shipped beside it."""
    config["auto_map"] = {"AutoConfig": f"modeling_slimgpt.{type(model.config).__name__}",
                          "AutoModelForCausalLM": f"modeling_slimgpt.{type(model).__name__}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(modeling_slimgpt.__file__, folder / "modeling_slimgpt.py")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def run_identity(folder: Path) -> dict | None:
    """A workspace run's name, label and summary (from meta.json); None for a folder that is not a run."""
    folder = Path(folder)
    if not (folder / META).exists() and not (folder / "report.json").exists():
        return None
    info = read_run(folder)
    return {"name": info.name, "label": info.label, "title": info.title, "summary": info.summary}


def model_card(model, report=None, evaluation: dict | None = None, source: str = "", hetero: bool = False,
               run: dict | None = None) -> str:
    settings = (report.settings if report is not None else None) or dict(getattr(model.config, "slimgpt", None) or {})
    # the model that was pruned, when known, names the card; else whatever was exported
    source = (report.model if report is not None else "") or settings.get("source_model", "") or source or "unknown"
    method = settings.get("method", "slimgpt")
    lists = describe_layers(model)
    lines = ["---", "library_name: transformers", "tags: [pruned, structured-pruning, slimgpt]", "---", ""]
    if run is not None:  # the run exported names the card, with what made it
        summary = run.get("summary") or {}
        facts = [f"method {summary.get('method') or method}"]
        schedule = summary.get("schedule") or settings.get("schedule")
        if schedule:
            facts.append(f"schedule {schedule}")
        if report is not None:
            facts.append(f"achieved {report.achieved_layer_ratio:.1%} of decoder-layer parameters removed "
                         f"({report.achieved_ratio:.1%} of all)")
        elif summary.get("achieved_layer_ratio") is not None:
            facts.append(f"achieved {summary['achieved_layer_ratio']:.1%} of decoder-layer parameters removed")
        lines += [f"# {run['title']}", "",
                  f"`{source}` pruned with SlimGPT Studio as run `{run['name']}`: {', '.join(facts)}.", ""]
    else:
        lines += [f"# {source} pruned with SlimGPT", ""]
    if method == "slimgpt":
        lines += ["Structured pruning (attention heads / KV groups and FFN channels) with layer-wise OBS compensation "
                  "(SlimGPT, Ling et al., NeurIPS 2024), written by SlimGPT Studio.", ""]
    else:
        lines += [f"Structured pruning with the `{method}` method, written by SlimGPT Studio.", ""]
    lines += ["## Parameters", ""]
    after = count_parameters(model)
    if report is not None:
        lines += [f"- before: {_fmt_params(report.params_before)} ({report.params_before:,})",
                  f"- after: {_fmt_params(after)} ({after:,})",
                  f"- requested mean layer ratio: {report.requested_ratio:.4f}; achieved: "
                  f"{report.achieved_layer_ratio:.4f} of decoder-layer parameters, {report.achieved_ratio:.4f} of all"]
    else:
        lines.append(f"- parameters: {_fmt_params(after)} ({after:,})")
    if settings:
        lines += ["", "## Method and settings", "", "| setting | value |", "|---|---|"]
        for key, value in settings.items():
            if key in ("head_ratios", "ffn_ratios") or value is None:
                continue
            lines.append(f"| {key} | {value} |")
    lines += ["", "## Layers", "", "| layer | query heads | KV heads | FFN width |", "|---|---|---|---|"]
    for i, (q, kv, f) in enumerate(zip(*(lists[k] for k in LAYER_KEYS))):
        lines.append(f"| {i} | {q} | {kv} | {f} |")
    evals = dict(report.evaluation) if report is not None and report.evaluation else {}
    evals.update(evaluation or {})
    if evals:
        lines += ["", "## Evaluation", "", "| measurement | value |", "|---|---|"]
        for key, value in evals.items():
            if isinstance(value, dict) and "ppl" in value:
                lines.append(f"| {key} ({value.get('dataset', '')}, {value.get('seqlen', '')} tokens, "
                             f"{value.get('windows', '')} windows) | {value['ppl']:.3f} |")
            elif isinstance(value, dict) and "acc" in value:
                lines.append(f"| {key} acc / acc_norm (limit {value.get('limit')}) | {value['acc']:.4f} / "
                             f"{value.get('acc_norm', float('nan')):.4f} |")
            elif isinstance(value, (int, float)):
                lines.append(f"| {key} | {value:.4f} |")
    load = ("model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # per-layer shapes: "
            "modeling_slimgpt.py") if hetero else "model = AutoModelForCausalLM.from_pretrained(path)"
    lines += ["", "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "path = \"<this folder>\"", load, "tokenizer = AutoTokenizer.from_pretrained(path)", "```", ""]
    if hetero:
        lines.append(f"Layers differ in shape, so `config.json` lists them per layer ({', '.join(LAYER_KEYS)}) and "
                     f"`modeling_slimgpt.py` (base architecture: {base_model_type(model.config)}) builds them. "
                     "vLLM cannot serve it today: its query-head count is one for all layers.")
    lines += ["", "## llama.cpp, Ollama, LM Studio", "",
              "`python -m slimgpt_core export --model <this folder> --format gguf --weight-type q8_0 --out model.gguf` "
              "writes one GGUF file (layers of different shapes as llama.cpp's `deci` architecture); then "
              "`llama-cli -m model.gguf -p \"Once upon a time\" -n 128`, or an Ollama `Modelfile` holding "
              "`FROM ./model.gguf` and `ollama create pruned -f Modelfile`."]
    return "\n".join(lines) + "\n"


def _check_zip_target(zip_path: Path, overwrite: bool) -> None:
    if zip_path.exists() and not overwrite:
        raise SlimGPTError(f"{zip_path} already exists (choose another --out or pass --force)")


def _place_zip(tmp_zip: Path, zip_path: Path) -> tuple[int, int]:
    try:
        os.replace(tmp_zip, zip_path)
        stat = zip_path.stat()
    except OSError as exc:  # the folder is in place; no zip (an older one was already removed)
        raise SlimGPTError(f"could not write {zip_path}: {exc.strerror or exc}; the folder beside it is complete, "
                           "without a zip") from None
    return stat.st_size, stat.st_mtime_ns


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def _write_folder_and_zip(out: Path, zip_path: Path | None, overwrite: bool, fill: Callable[[Path], None],
                          zip_progress: Callable[[Path], ByteProgress]) -> tuple[int, int] | None:
    """`fill` the folder `out` all at once and, with `zip_path`, zip it beside it. The zip is complete before either
    name changes, and an older zip goes first: a failure never leaves a new folder beside the zip of an older export.
    Returns the placed zip's (size, mtime) stamp."""
    tmp_zip = None
    try:
        with atomic_folder(out, overwrite) as tmp:
            fill(tmp)
            if zip_path is not None:
                tmp_zip = write_zip(tmp, zip_path, zip_progress(tmp))
                zip_path.unlink(missing_ok=True)
        return _place_zip(tmp_zip, zip_path) if zip_path is not None else None
    finally:
        if tmp_zip is not None:
            tmp_zip.unlink(missing_ok=True)


def export_checkpoint(model, tokenizer, out: str | Path, report=None, evaluation: dict | None = None,
                      source: str = "", make_zip: bool = False, overwrite: bool = False,
                      extra: Callable[[Path], None] | None = None, run: dict | None = None,
                      callback: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> ExportResult:
    """Write the checkpoint (and report.json) into `out` all at once, optionally zipped beside it.
    `extra(tmp)` writes further files into the folder before it appears (the workspace's meta.json)."""
    out = Path(out)
    zip_path = zip_path_for(out) if make_zip else None
    if zip_path is not None:
        check_output_folder(out, overwrite)
        _check_zip_target(zip_path, overwrite)
    hetero = []

    def fill(tmp: Path) -> None:
        hetero.append(write_checkpoint(model, tokenizer, tmp, report, evaluation, source, run))
        if report is not None:
            report.save(tmp / "report.json")
        if extra is not None:
            extra(tmp)

    stamp = _write_folder_and_zip(out, zip_path, overwrite, fill,
                                  lambda tmp: ByteProgress(_folder_bytes(tmp), callback, should_stop))
    return ExportResult(out, zip_path, hetero[0], count_parameters(model), sorted(p.name for p in out.iterdir()),
                        source=(run or {}).get("name", source), title=(run or {}).get("title", source),
                        card=(out / "README.md").read_text(), zip_stamp=stamp)


def _card_inputs(folder: Path | None) -> tuple:
    """What a source folder says about itself for the card: its report, its measurements, the run it is."""
    if folder is None or not folder.is_dir():
        return None, {}, None
    report = PruneReport.load(folder / "report.json") if (folder / "report.json").exists() else None
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
    from transformers import AutoModelForCausalLM

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
        _check_zip_target(zip_path, overwrite)
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
            _add_remote_code(tmp, model, json.loads((folder / "config.json").read_text()))
        (tmp / "README.md").write_text(card)

    stamp = _write_folder_and_zip(out, zip_path, overwrite, fill, lambda tmp: progress)
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
