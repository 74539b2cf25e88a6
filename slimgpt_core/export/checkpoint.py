"""Checkpoints that load anywhere (SPEC §4): safetensors shards, config, tokenizer, model card.

Layers of one shape: a stock checkpoint. Layers of different shapes: the config carries per-layer lists and an
`auto_map` to `modeling_slimgpt.py`, shipped alongside (`trust_remote_code=True` to load)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimgpt_core.export import modeling_slimgpt
from slimgpt_core.methods.surgery import LAYER_KEYS, base_model_type, count_parameters, describe_layers, is_heterogeneous

MAX_SHARD = "2GB"


@dataclass
class ExportResult:
    folder: Path
    zip_path: Path | None
    heterogeneous: bool
    parameters: int
    files: list[str]


def write_checkpoint(model, tokenizer, folder: Path, report=None, evaluation: dict | None = None,
                     source: str = "") -> bool:
    """Write the model into an existing empty folder; returns whether remote code was needed."""
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=MAX_SHARD)
    tokenizer.save_pretrained(folder)
    hetero = is_heterogeneous(model.config)
    if hetero:
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = {"AutoConfig": f"modeling_slimgpt.{type(model.config).__name__}",
                              "AutoModelForCausalLM": f"modeling_slimgpt.{type(model).__name__}"}
        config_path.write_text(json.dumps(config, indent=2))
        shutil.copyfile(modeling_slimgpt.__file__, folder / "modeling_slimgpt.py")
    (folder / "README.md").write_text(model_card(model, report, evaluation, source, hetero))
    return hetero


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def model_card(model, report=None, evaluation: dict | None = None, source: str = "", hetero: bool = False) -> str:
    settings = (report.settings if report is not None else None) or dict(getattr(model.config, "slimgpt", None) or {})
    # the model that was pruned, when known, names the card; else whatever was exported
    source = (report.model if report is not None else "") or settings.get("source_model", "") or source or "unknown"
    lists = describe_layers(model)
    lines = ["---", "library_name: transformers", "tags: [pruned, structured-pruning, slimgpt]", "---", "",
             f"# {source} pruned with SlimGPT", "",
             "Structured pruning (attention heads / KV groups and FFN channels) with layer-wise OBS compensation "
             "(SlimGPT, Ling et al., NeurIPS 2024), written by SlimGPT Studio.", "", "## Parameters", ""]
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
                     f"`modeling_slimgpt.py` (base architecture: {base_model_type(model.config)}) builds them.")
    return "\n".join(lines) + "\n"


def export_checkpoint(model, tokenizer, out: str | Path, report=None, evaluation: dict | None = None,
                      source: str = "", make_zip: bool = False, overwrite: bool = False,
                      extra: Callable[[Path], None] | None = None) -> ExportResult:
    """Write the checkpoint (and report.json) into `out` all at once, optionally zipped beside it.
    `extra(tmp)` writes further files into the folder before it appears (the workspace's meta.json)."""
    from slimgpt_core.workspace.atomic import atomic_folder, atomic_zip

    out = Path(out)
    with atomic_folder(out, overwrite) as tmp:
        hetero = write_checkpoint(model, tokenizer, tmp, report, evaluation, source)
        if report is not None:
            report.save(tmp / "report.json")
        if extra is not None:
            extra(tmp)
    zip_path = atomic_zip(out, out.with_suffix(".zip")) if make_zip else None
    return ExportResult(out, zip_path, hetero, count_parameters(model), sorted(p.name for p in out.iterdir()))


def export_model(source: str, out: str | Path, make_zip: bool = False, overwrite: bool = False,
                 dtype: str = "auto") -> ExportResult:
    """Load a model or run folder and write a checkpoint folder (and optionally a zip beside it)."""
    from slimgpt_core.events import PruneReport
    from slimgpt_core.models import load_model

    loaded = load_model(source, "cpu", dtype)
    folder = Path(loaded.path)
    report = PruneReport.load(folder / "report.json") if (folder / "report.json").exists() else None
    evaluation = {}
    if (folder / "eval.json").exists():
        evaluation = _flatten_eval(json.loads((folder / "eval.json").read_text()))
    from slimgpt_core.workspace.store import read_evaluations
    for record in read_evaluations(folder):  # measurements the studio stored with the run; latest wins
        key = {"perplexity": "perplexity", "task": record.get("task")}.get(record.get("kind"))
        if key:
            evaluation[key] = record
    return export_checkpoint(loaded.model, loaded.tokenizer, out, report, evaluation, source, make_zip, overwrite)


def _flatten_eval(payload: dict) -> dict:
    flat = {}
    if "perplexity" in payload:
        flat["perplexity"] = payload["perplexity"]
    for task, res in (payload.get("tasks") or {}).items():
        flat[task] = res
    return flat
