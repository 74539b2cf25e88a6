"""What the Streamlit pages call: one function per action, plain dataclasses back. No Streamlit here."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import AchievedRatios, Progress, RunReport
from slimgpt_core.base.shapes import count_parameters, kept_heads, layer_parameters, layer_shape
from slimgpt_core.data import calibration_tokens
from slimgpt_core.evaluation.evaluate import cached_perplexity
from slimgpt_core.evaluation.speed import measure_speed
from slimgpt_core.evaluation.zeroshot import zero_shot
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import QUERY_HEAD_METHODS, PruneSettings, plan_removals
from slimgpt_core.methods.statistics import DenseStatistics, dense_statistics
from slimgpt_core.models import LoadedModel, load_model
from slimgpt_core.schedules.schedule import layer_ratios
from slimgpt_core.training.recover import load_source_report, recover, recovered_report
from slimgpt_core.workspace.exports import export_model
from slimgpt_core.workspace.model_pool import POOL
from slimgpt_core.workspace.store import add_measurement, read_run, save_run


@dataclass
class ModelInfo:
    name: str
    path: str
    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    parameters: int
    layer_parameters: int
    dtype: str
    context: int | None


def describe_model(loaded: LoadedModel) -> ModelInfo:
    m, c = loaded.model, loaded.model.config
    q, kv, f = layer_shape(m.model.layers[0])
    return ModelInfo(loaded.name, loaded.path, c.model_type, len(m.model.layers), c.hidden_size, q, kv,
                     m.model.layers[0].self_attn.head_dim, f, c.vocab_size, count_parameters(m),
                     count_parameters(m.model.layers), str(next(m.parameters()).dtype).replace("torch.", ""),
                     getattr(c, "max_position_embeddings", None))


@dataclass
class SchedulePreview(AchievedRatios):
    head_ratios: list[float]
    ffn_ratios: list[float]
    heads_kept: list[int]  # query heads per layer
    kv_kept: list[int]
    ffn_kept: list[int]
    layer_params_before: int
    layer_params_after: int
    params_before: int
    params_after: int


def _layer_params(layer, q: int, kv: int, f: int) -> int:
    return layer_parameters(layer, q, kv, f)


def preview_schedule(model, settings: PruneSettings) -> SchedulePreview:
    """What a schedule would give, from arithmetic alone (instant; validates like a real run)."""
    head_r, ffn_r, head_rm, ffn_rm = plan_removals(model, settings)
    heads, kvs, ffns, before, after = [], [], [], 0, 0
    for layer, hr, fr in zip(model.model.layers, head_rm, ffn_rm):
        q, kv, f = layer_shape(layer)
        q_kept, kv_kept = kept_heads(q, kv, hr, settings.method in QUERY_HEAD_METHODS)
        heads.append(q_kept)
        kvs.append(kv_kept)
        ffns.append(f - fr)
        before += _layer_params(layer, q, kv, f)
        after += _layer_params(layer, q_kept, kv_kept, f - fr)
    total = count_parameters(model)
    return SchedulePreview(head_r, ffn_r, heads, kvs, ffns, before, after, total, total - before + after)


@dataclass
class PruneRun:
    """A finished pruning run held in memory by the app."""
    id: str
    label: str
    model_name: str
    model: torch.nn.Module
    tokenizer: object
    report: RunReport
    calib: dict = field(default_factory=dict)


def run_pruning(loaded: LoadedModel, settings: PruneSettings, calib: str, nsamples: int, seqlen: int, seed: int = 0,
                label: str = "", callback: Callable | None = None,
                should_stop: Callable[[], bool] | None = None) -> PruneRun:
    """Prune a copy of the loaded model (the dense one stays intact for comparison)."""
    emit = callback or (lambda e: None)
    emit(Progress(0, len(loaded.model.model.layers), "calibration data", 0.0))
    tokens = calibration_tokens(loaded.tokenizer, calib, nsamples, seqlen, seed)
    model = copy.deepcopy(loaded.model)
    report = prune_model(model, tokens, settings, callback, should_stop, model_name=loaded.name)
    report.settings.update(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    run_id = time.strftime("%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
    label = label or schedule_label(report, settings)
    return PruneRun(run_id, label, loaded.name, model, loaded.tokenizer, report,
                    {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed})


def schedule_label(report: RunReport, settings: PruneSettings) -> str:
    """A label describing the schedule the run actually used (the per-layer ratios, not the target slider):
    the preset's name when the ratios are the preset's, else "custom"; the mean requested ratio."""
    n = len(report.head_ratios)
    name = settings.schedule if settings.method == "slimgpt" else settings.method
    if settings.head_ratios is not None or settings.ffn_ratios is not None:
        try:
            preset = layer_ratios(n, settings.ratio, settings.schedule, settings.shape)
            same = all(abs(a - b) < 5e-3 for a, b in zip(report.head_ratios + report.ffn_ratios, preset + preset))
        except SlimGPTError:  # a schedule that cannot be built from the target (e.g. auto): the lists speak
            same = False
        name = name if same else f"{name} (edited)" if settings.method != "slimgpt" else "custom"
    mode = "" if settings.sequential else " dense-in"
    return f"{name} {report.requested_ratio:.0%}{mode}"


def prune_to_workspace(loaded: LoadedModel, settings: PruneSettings, calib: str, nsamples: int, seqlen: int,
                       seed: int = 0, label: str = "", device: str = "auto", source_run: str | None = None,
                       callback: Callable | None = None, should_stop: Callable[[], bool] | None = None):
    """Prune a copy of the loaded model and write it into the workspace; the job's result is the listed run.

    Written by the job itself, so a run finished while no page watches is already on disk."""

    run = run_pruning(loaded, settings, calib, nsamples, seqlen, seed, label, callback, should_stop)
    if source_run:
        run.report.settings["source_run"] = source_run  # a twin names the run it mirrors
    info = save_run(run.model, run.tokenizer, run.report, label=run.label)
    POOL.put(str(info.path), LoadedModel(run.model, run.tokenizer, str(info.path), str(info.path)), device)
    return info


def head_importance(loaded: LoadedModel, calib: str, nsamples: int, seqlen: int, seed: int = 0, damp: float = 0.01,
                    device: str = "auto", callback: Callable | None = None,
                    should_stop: Callable[[], bool] | None = None) -> DenseStatistics:
    """Dense per-layer statistics (cached) scoring every head group and channel, for instant previews."""
    tokens = calibration_tokens(loaded.tokenizer, calib, nsamples, seqlen, seed)
    n = len(loaded.model.model.layers)

    def progress(done, total):
        if callback is not None:
            callback(Progress(min(done, n - 1), n, "dense statistics" if done < total else "done", 0.0))

    return dense_statistics(loaded.model, tokens, damp, device=device, progress=progress, should_stop=should_stop)


@dataclass
class EvalResult:
    label: str
    perplexity: dict | None
    tasks: dict[str, dict]
    speed: dict | None
    parameters: int


def evaluate(models: dict[str, tuple], ppl_source: str | None, seqlen: int, max_windows: int | None,
             tasks: list[str], limit: int | None, speed: bool, device: str = "auto", batch_size: int = 8,
             callback: Callable | None = None, should_stop: Callable[[], bool] | None = None,
             record_to: dict[str, Path] | None = None) -> list[EvalResult]:
    """Evaluate several (model, tokenizer) pairs the same way; progress events name the model and step.

    With `record_to` {label: folder}, every measurement is appended to that folder's evaluations.json at
    once, with its provenance, so a finished step survives a reload, a cancel or a restart."""

    dev = resolve_device(device)
    emit = callback or (lambda e: None)
    steps = [(label, what) for label in models for what in
             (["perplexity"] if ppl_source else []) + list(tasks) + (["speed"] if speed else [])]
    done = 0
    results = []
    for label, (model, tokenizer) in models.items():
        home = next(model.parameters()).device
        model.to(dev)
        res = EvalResult(label, None, {}, None, count_parameters(model))

        def record(kind: str, value: dict, folder=(record_to or {}).get(label)) -> None:
            if folder is not None:
                add_measurement(folder, kind, value, batch_size=batch_size, device=str(dev),
                                parameters=res.parameters)

        try:
            if ppl_source:
                emit(Progress(done, len(steps), f"{label}: perplexity", 0.0))
                res.perplexity = asdict(cached_perplexity(model, tokenizer, ppl_source, seqlen, batch_size,
                                                          max_windows, dev, should_stop=should_stop))
                record("perplexity", res.perplexity)
                done += 1
            for task in tasks:
                emit(Progress(done, len(steps), f"{label}: {task}", 0.0))
                res.tasks[task] = asdict(zero_shot(model, tokenizer, [task], limit, batch_size,
                                                   should_stop=should_stop)[task])
                record("task", res.tasks[task])
                done += 1
            if speed:
                emit(Progress(done, len(steps), f"{label}: speed", 0.0))
                res.speed = asdict(measure_speed(model, (1, 4), (128,), 16, 2))
                record("speed", res.speed)
                done += 1
        finally:
            model.to(home)
        results.append(res)
    emit(Progress(len(steps), len(steps), "done", 0.0))
    return results


def export_run(run_folder: str | Path, out: str | Path, make_zip: bool = True, dtype: str | None = None,
               overwrite: bool = True, callback: Callable | None = None, should_stop: Callable[[], bool] | None = None):
    """Write a workspace run as a loadable checkpoint (+ zip), in the dtype asked for ("as stored": the run's own
    dtype, its weight files copied as they are). The result names the run it came from."""

    return export_model(str(run_folder), out, make_zip, overwrite,
                        "auto" if not dtype or dtype in ("as stored", "as loaded") else dtype,
                        callback=callback, should_stop=should_stop)


@dataclass
class RecoveryOutcome:
    """A recovery job's result as the studio shows it: the new run and the perplexities side by side."""
    run: object  # workspace.RunInfo of the recovered run
    ppl_before: dict | None
    ppl_after: dict | None
    dense_ppl: dict | None  # the source model's, same text and windows (None when it is not loaded)
    heldout: list[dict]


def recover_to_workspace(run_folder: str | Path, settings, label: str = "", dense: LoadedModel | None = None,
                         callback: Callable | None = None, should_stop: Callable[[], bool] | None = None):
    """LoRA-recover a workspace run (a fresh copy from disk, never the pool's) into a new workspace run."""

    source = read_run(Path(run_folder))
    loaded = load_model(str(source.path), "cpu")
    result = recover(loaded.model, loaded.tokenizer, settings, callback, should_stop)
    report = recovered_report(result, load_source_report(source.path), source.name)
    report.settings["source_run"] = source.name
    info = save_run(result.model, loaded.tokenizer, report,
                    label=label or f"{source.label or source.name} + LoRA {len(result.steps)} steps")
    dense_ppl = None
    if dense is not None and settings.ppl_source and dense.name == report.model:
        dense_ppl = asdict(cached_perplexity(dense.model, dense.tokenizer, settings.ppl_source, settings.ppl_seqlen,
                                             8, settings.ppl_windows, resolve_device(settings.device)))
    for folder, ppl in ((source.path, result.ppl_before), (info.path, result.ppl_after)):
        if ppl is not None:  # stored with each run like any other measurement
            add_measurement(folder, "perplexity", ppl, device=result.device)
    return RecoveryOutcome(read_run(info.path), result.ppl_before, result.ppl_after, dense_ppl, result.heldout)
