"""Prune: load → check → calibrate → prune → save → measure, for the command line (`prune_to_folder`) and the
studio (`prune_to_workspace`, `run_pruning`), plus the prune page's instant previews. No Streamlit here."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from slimgpt_core import data
from slimgpt_core.base.atomic import check_output_folder
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import AchievedRatios, Progress, RunReport
from slimgpt_core.base.shapes import (check_context_length, count_parameters, kept_heads, layer_parameters, layer_shape,
                                      target_shape)
from slimgpt_core.methods.activations import activation_streams, check_memory
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import QUERY_HEAD_METHODS, PruneSettings, plan_removals
from slimgpt_core.methods.statistics import DenseStatistics, dense_statistics
from slimgpt_core.models import LoadedModel, load_config, load_model
from slimgpt_core.schedules.global_allocation import BudgetSpec
from slimgpt_core.schedules.refine import AutoConfig, auto_schedule
from slimgpt_core.schedules.schedule import AUTO_FITNESS_SAMPLES, layer_ratios
from slimgpt_core.services.evaluate import no_bar, perplexity
from slimgpt_core.workspace.model_pool import POOL
from slimgpt_core.workspace.store import add_measurement, new_run_name, runs_root, save_run, save_run_at


@dataclass
class Calibration:
    """The calibration text: `nsamples` windows of `seqlen` tokens drawn from `source` with `seed`."""
    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def tokens(self, tokenizer) -> torch.Tensor:
        return data.calibration_tokens(tokenizer, self.source, self.nsamples, self.seqlen, self.seed)

    def record(self) -> dict:  # as the run's report.settings names them
        return {"calib": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


@dataclass
class AutoRequest:
    """`--schedule auto`: the budget beyond the settings' ratios, and how long the KL search refines it."""
    budget_scope: str = "layers"
    target_params: int | None = None
    min_keep: float | None = None
    ceiling: float | None = None
    seconds: float = 600.0
    generations: int | None = None
    fitness_samples: int = AUTO_FITNESS_SAMPLES
    fitness_seqlen: int = 128


@dataclass
class PruneRequest:
    """A prune written to a folder (the command line's `prune`)."""
    model: str
    settings: PruneSettings
    calibration: Calibration
    out: str | Path | None = None  # None: a new run in the workspace
    overwrite: bool = False
    label: str = ""
    dtype: str = "auto"
    ppl: str | None = None
    ppl_seqlen: int = 128
    ppl_windows: int | None = None
    target_config: str | None = None  # prune to another model's shape
    auto: AutoRequest = field(default_factory=AutoRequest)


def check_prune(model, settings: PruneSettings, calibration: Calibration, device, seqlen_name: str = "--seqlen"):
    """Refuse before any work: a window longer than the context, a schedule the model cannot take, activations
    that do not fit."""
    check_context_length(model.config, calibration.seqlen, seqlen_name)
    if settings.schedule != "auto":  # auto: validated once the search has chosen the counts
        plan_removals(model, settings)
    check_memory(model, calibration.nsamples, calibration.seqlen, device, 2 * sum(activation_streams(settings)))


def calibrate_and_prune(model, tokenizer, model_name: str, settings: PruneSettings, calibration: Calibration,
                        callback: Callable | None = None, should_stop: Callable[[], bool] | None = None,
                        auto: AutoRequest | None = None, show_auto: Callable | None = None) -> RunReport:
    """Draw the calibration windows, choose the auto schedule when asked, prune `model` in place; the report
    records the calibration and the weights' dtype."""
    tokens = calibration.tokens(tokenizer)
    result = None
    if settings.schedule == "auto":
        result = choose_auto_schedule(model, tokenizer, tokens, settings, calibration, auto or AutoRequest(),
                                      show_auto)
    report = prune_model(model, tokens, settings, callback, should_stop, model_name=model_name)
    report.settings.update(**calibration.record(), dtype=str(next(model.parameters()).dtype))
    if result is not None:
        report.settings["auto"] = {k: v for k, v in asdict(result).items() if k not in ("history", "snapshots")}
    return report


def choose_auto_schedule(model, tokenizer, tokens, settings: PruneSettings, calibration: Calibration,
                         auto: AutoRequest, show: Callable | None = None):
    """The fast schedule for the budget, refined by the KL search for `auto.seconds` (refine.py); its counts go
    into `settings`. The settings' head_ratio/ffn_ratio set the heads' and the FFN's budgets apart."""
    if auto.min_keep is not None and auto.ceiling is not None:
        raise SlimGPTError("give --min-keep or --ceiling, not both (--ceiling C is --min-keep 1-C)")
    min_keep = auto.min_keep if auto.min_keep is not None else 1.0 - auto.ceiling if auto.ceiling is not None else 0.1
    if auto.seconds < 0:
        raise SlimGPTError(f"--auto-seconds must be 0 or more, got {auto.seconds:g}")
    fitness = data.calibration_tokens(tokenizer, calibration.source, auto.fitness_samples, auto.fitness_seqlen,
                                      calibration.seed + 1)
    budget = BudgetSpec(ratio=settings.ratio, scope=auto.budget_scope, target_params=auto.target_params,
                        head_ratio=settings.head_ratio, ffn_ratio=settings.ffn_ratio, min_keep=min_keep)
    config = AutoConfig(budget=budget, max_seconds=auto.seconds, generations=auto.generations,
                        refine=auto.seconds > 0, shape=settings.shape, seed=calibration.seed, damp=settings.damp,
                        batch_size=settings.batch_size, device=settings.device)
    result = auto_schedule(model, tokens, fitness, config, show)
    model.to("cpu")
    if show is not None:
        show(result)  # the schedule chosen, after the search's progress
    settings.keep_heads, settings.keep_ffn = result.keep_heads, result.keep_ffn
    settings.head_ratios, settings.ffn_ratios = result.head_ratios, result.ffn_ratios
    return result


def target_keep(spec: str, model) -> tuple[list[int], list[int]]:
    """Per-layer query heads and FFN channels of another model's shape: a config.json, folder or hub id."""
    path = Path(spec)
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except ValueError:
            raise SlimGPTError(f"{spec} is not a JSON config") from None
    else:
        config = load_config(spec)[0].to_dict()
    return target_shape(config, model)


def prune_to_folder(request: PruneRequest, callback: Callable | None = None, bars: Callable = no_bar,
                    show_auto: Callable | None = None, rank: int = 0) -> dict:
    """The command line's prune: a new run folder (`request.out`, else a new workspace run) with the pruned model
    and its report, the perplexities before and after measured when asked; a summary back. Under torchrun every
    rank prunes its shard of the calibration data; rank 0 measures and writes."""
    s = request.settings
    out = check_output_folder(request.out or runs_root() / new_run_name(
        f"{Path(request.model).stem}-{s.method}-{s.schedule}-{s.ratio:g}"), request.overwrite)
    device = resolve_device(s.device)
    loaded = load_model(request.model, s.device, request.dtype)
    if request.target_config:
        s.keep_heads, s.keep_ffn = target_keep(request.target_config, loaded.model)
    check_prune(loaded.model, s, request.calibration, device)
    evaluation = {}
    if request.ppl and rank == 0:
        evaluation["dense_ppl"] = _ppl(loaded, request, device, bars, "dense")
    report = calibrate_and_prune(loaded.model, loaded.tokenizer, loaded.name, s, request.calibration, callback,
                                 auto=request.auto, show_auto=show_auto)
    if rank > 0:
        return {}  # every rank holds the same pruned model; rank 0 writes it
    if request.ppl:
        evaluation["pruned_ppl"] = _ppl(loaded, request, device, bars, "pruned")
    report.evaluation = evaluation
    save_run_at(loaded.model, loaded.tokenizer, report, out, request.overwrite, request.label)
    if "pruned_ppl" in evaluation:  # listed with the run, like the studio's measurements
        add_measurement(out, "perplexity", evaluation["pruned_ppl"], batch_size=s.batch_size, device=str(device),
                        parameters=report.params_after)
    return prune_summary(out, report, evaluation)


def _ppl(loaded: LoadedModel, request: PruneRequest, device, bars: Callable, label: str) -> dict:
    loaded.model.to(device)
    try:
        return perplexity(loaded.model, loaded.tokenizer, request.ppl, request.ppl_seqlen, request.ppl_windows,
                          request.settings.batch_size, device, bars(f"ppl {label}", "window"))
    finally:
        loaded.model.to("cpu")


def prune_summary(out: Path, report: RunReport, evaluation: dict) -> dict:
    summary = {"out": str(out), "params_before": report.params_before, "params_after": report.params_after,
               "requested_ratio": round(report.requested_ratio, 4),
               "achieved_layer_ratio": round(report.achieved_layer_ratio, 4),
               "achieved_ratio": round(report.achieved_ratio, 4), "seconds": round(report.total_seconds, 1)}
    for key, value in evaluation.items():
        summary[key] = round(value["ppl"], 3)
    if report.shots:  # multi-shot methods: the allocation (a schedule for --keep-heads/--keep-ffn) and the curve
        summary.update(keep_heads=report.shots[-1].keep_heads, keep_ffn=report.shots[-1].keep_ffn,
                       shots=[{"shot": s.shot, "removed": round(s.removed_fraction, 4),
                               "heldout_ppl": round(s.heldout_ppl, 3)} for s in report.shots])
    return summary


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
    calibration = Calibration(calib, nsamples, seqlen, seed)
    check_context_length(loaded.model.config, seqlen)
    model = copy.deepcopy(loaded.model)
    report = calibrate_and_prune(model, loaded.tokenizer, loaded.name, settings, calibration, callback, should_stop)
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
        before += layer_parameters(layer, q, kv, f)
        after += layer_parameters(layer, q_kept, kv_kept, f - fr)
    total = count_parameters(model)
    return SchedulePreview(head_r, ffn_r, heads, kvs, ffns, before, after, total, total - before + after)


def head_importance(loaded: LoadedModel, calib: str, nsamples: int, seqlen: int, seed: int = 0, damp: float = 0.01,
                    device: str = "auto", callback: Callable | None = None,
                    should_stop: Callable[[], bool] | None = None) -> DenseStatistics:
    """Dense per-layer statistics (cached) scoring every head group and channel, for instant previews."""
    tokens = data.calibration_tokens(loaded.tokenizer, calib, nsamples, seqlen, seed)
    n = len(loaded.model.model.layers)

    def progress(done, total):
        if callback is not None:
            callback(Progress(min(done, n - 1), n, "dense statistics" if done < total else "done", 0.0))

    return dense_statistics(loaded.model, tokens, damp, device=device, progress=progress, should_stop=should_stop)
