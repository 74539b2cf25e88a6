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

from slimgpt_core.base import modeling_slimgpt
from slimgpt_core.base.atomic import atomic_folder, check_output_folder
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import LAYER_KEYS, base_model_type, count_parameters, describe_layers, is_heterogeneous
from slimgpt_core.export.archive import ByteProgress, write_zip

MAX_SHARD = "2GB"


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
        add_remote_code(folder, model, json.loads((folder / "config.json").read_text()))
    (folder / "README.md").write_text(model_card(model, report, evaluation, source, hetero, run))
    return hetero


def add_remote_code(folder: Path, model, config: dict) -> None:
    """Per-layer shapes: config.json points `auto_map` at modeling_slimgpt.py, shipped beside it."""
    config["auto_map"] = {"AutoConfig": f"modeling_slimgpt.{type(model.config).__name__}",
                          "AutoModelForCausalLM": f"modeling_slimgpt.{type(model).__name__}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(modeling_slimgpt.__file__, folder / "modeling_slimgpt.py")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def _card_heading(report, settings: dict, source: str, method: str, run: dict | None) -> list[str]:
    """The title and what made the model: the run exported when there is one, else the pruned model's name."""
    if run is None:
        return [f"# {source} pruned with SlimGPT", ""]
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
    return [f"# {run['title']}", "",
            f"`{source}` pruned with SlimGPT Studio as run `{run['name']}`: {', '.join(facts)}.", ""]


def _card_parameters(model, report, settings: dict) -> list[str]:
    """The parameters before and after, and the settings table."""
    lines = ["## Parameters", ""]
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
    return lines


def _card_evaluation(report, evaluation: dict | None) -> list[str]:
    """The report's measurements and the given ones (perplexities, zero-shot accuracies, plain numbers)."""
    evals = dict(report.evaluation) if report is not None and report.evaluation else {}
    evals.update(evaluation or {})
    if not evals:
        return []
    lines = ["", "## Evaluation", "", "| measurement | value |", "|---|---|"]
    for key, value in evals.items():
        if isinstance(value, dict) and "ppl" in value:
            lines.append(f"| {key} ({value.get('dataset', '')}, {value.get('seqlen', '')} tokens, "
                         f"{value.get('windows', '')} windows) | {value['ppl']:.3f} |")
        elif isinstance(value, dict) and "acc" in value:
            lines.append(f"| {key} acc / acc_norm (limit {value.get('limit')}) | {value['acc']:.4f} / "
                         f"{value.get('acc_norm', float('nan')):.4f} |")
        elif isinstance(value, (int, float)):
            lines.append(f"| {key} | {value:.4f} |")
    return lines


def _card_loading(model, hetero: bool) -> list[str]:
    """How to load it with transformers, and how to run it in llama.cpp, Ollama or LM Studio."""
    load = ("model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # per-layer shapes: "
            "modeling_slimgpt.py") if hetero else "model = AutoModelForCausalLM.from_pretrained(path)"
    lines = ["", "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
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
    return lines


def model_card(model, report=None, evaluation: dict | None = None, source: str = "", hetero: bool = False,
               run: dict | None = None) -> str:
    settings = (report.settings if report is not None else None) or dict(getattr(model.config, "slimgpt", None) or {})
    # the model that was pruned, when known, names the card; else whatever was exported
    source = (report.model if report is not None else "") or settings.get("source_model", "") or source or "unknown"
    method = settings.get("method", "slimgpt")
    lists = describe_layers(model)
    lines = ["---", "library_name: transformers", "tags: [pruned, structured-pruning, slimgpt]", "---", ""]
    lines += _card_heading(report, settings, source, method, run)
    if method == "slimgpt":
        lines += ["Structured pruning (attention heads / KV groups and FFN channels) with layer-wise OBS compensation "
                  "(SlimGPT, Ling et al., NeurIPS 2024), written by SlimGPT Studio.", ""]
    else:
        lines += [f"Structured pruning with the `{method}` method, written by SlimGPT Studio.", ""]
    lines += _card_parameters(model, report, settings)
    lines += ["", "## Layers", "", "| layer | query heads | KV heads | FFN width |", "|---|---|---|---|"]
    for i, (q, kv, f) in enumerate(zip(*(lists[k] for k in LAYER_KEYS))):
        lines.append(f"| {i} | {q} | {kv} | {f} |")
    lines += _card_evaluation(report, evaluation)
    lines += _card_loading(model, hetero)
    return "\n".join(lines) + "\n"


def check_zip_target(zip_path: Path, overwrite: bool) -> None:
    if zip_path.exists() and not overwrite:
        raise SlimGPTError(f"{zip_path} already exists (choose another --out or pass --force)")


def place_zip(tmp_zip: Path, zip_path: Path) -> tuple[int, int]:
    try:
        os.replace(tmp_zip, zip_path)
        stat = zip_path.stat()
    except OSError as exc:  # the folder is in place; no zip (an older one was already removed)
        raise SlimGPTError(f"could not write {zip_path}: {exc.strerror or exc}; the folder beside it is complete, "
                           "without a zip") from None
    return stat.st_size, stat.st_mtime_ns


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def write_folder_and_zip(out: Path, zip_path: Path | None, overwrite: bool, fill: Callable[[Path], None],
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
        return place_zip(tmp_zip, zip_path) if zip_path is not None else None
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
        check_zip_target(zip_path, overwrite)
    hetero = []

    def fill(tmp: Path) -> None:
        hetero.append(write_checkpoint(model, tokenizer, tmp, report, evaluation, source, run))
        if report is not None:
            report.save(tmp / "report.json")
        if extra is not None:
            extra(tmp)

    stamp = write_folder_and_zip(out, zip_path, overwrite, fill,
                                  lambda tmp: ByteProgress(folder_bytes(tmp), callback, should_stop))
    return ExportResult(out, zip_path, hetero[0], count_parameters(model), sorted(p.name for p in out.iterdir()),
                        source=(run or {}).get("name", source), title=(run or {}).get("title", source),
                        card=(out / "README.md").read_text(), zip_stamp=stamp)


