"""Shear as the studio runs it: a source (the loaded model or a workspace run) to a new workspace run, with
progress events and cancellation, a plain dataclass back. No Streamlit here; the page calls one function.

The source is never changed: the loaded model is copied, a run is read fresh from disk. Nothing is written until
the cut model is complete, and then all at once (a cancelled or failed job leaves no folder)."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.base.events import Progress
from slimgpt_core.base.shapes import check_context_length, count_parameters
from slimgpt_core.evaluation.evaluate import cached_perplexity
from slimgpt_core.export.checkpoint import export_checkpoint
from slimgpt_core.methods.shear.size import parameter_count
from slimgpt_core.methods.shear.target import Shape, resolve_target, source_shape
from slimgpt_core.methods.shear.train import ShearSettings, ShearStep, shear_model
from slimgpt_core.models import LoadedModel, load_model
from slimgpt_core.services.shear_run import check_training_memory, training_tokens
from slimgpt_core.workspace.model_pool import POOL
from slimgpt_core.workspace.store import (add_measurement, dense_evaluations_folder, new_run_name, read_run, runs_root,
                                          write_meta)


@dataclass
class ShearStart:
    """Sent once before the first step: what the live curves are drawn against."""
    source: dict  # Shape.to_dict()
    target: dict
    params_before: int
    params_target: int
    steps: int
    kind: str = "shear-start"


@dataclass
class ShearOutcome:
    """A finished shear job: the new run and what it measured."""
    run: object  # workspace.RunInfo
    source: Shape
    target: Shape
    kept_layers: list[int]
    params_before: int
    params_after: int
    tokens_seen: int
    seconds: float
    expected_at_end: dict[str, float]  # the masks' expected sizes after the last step, before the cut
    dense_ppl: dict | None
    sheared_ppl: dict | None


def shear_label(model_name: str, target: Shape) -> str:
    return (f"{model_name} shear {target.layers}L {target.kv_groups}x{target.heads_per_group}h "
            f"ffn{target.ffn} d{target.hidden}")


def shear_to_workspace(source: LoadedModel | str | Path, target: dict, settings: ShearSettings, data: list[str],
                       seqlen: int, ppl_source: str | None = "wikitext2", ppl_seqlen: int = 128,
                       ppl_windows: int | None = 16, label: str = "", callback: Callable | None = None,
                       should_stop: Callable[[], bool] | None = None) -> ShearOutcome:
    """Learn masks to `target` (a dict as `--target` takes, already read) on `data`, cut, and write the result
    into the workspace as a run. `source`: the loaded model (copied) or a run folder (loaded from disk)."""

    emit = callback or (lambda e: None)
    stop = should_stop or (lambda: False)
    t0 = time.perf_counter()
    emit(Progress(0, settings.steps, "loading the source", 0.0))
    if isinstance(source, LoadedModel):
        model, tokenizer, name, source_run = copy.deepcopy(source.model), source.tokenizer, source.name, None
    else:
        loaded = load_model(str(source), "cpu")
        model, tokenizer, name, source_run = loaded.model, loaded.tokenizer, Path(source).name, Path(source)
    shape = resolve_target(target, model)
    check_context_length(model.config, seqlen)
    device = resolve_device(settings.device)
    check_training_memory(model, settings.batch_size, seqlen, device, settings.train_weights)
    emit(Progress(0, settings.steps, "training data", time.perf_counter() - t0))
    tokens = training_tokens(tokenizer, data, settings.steps, settings.batch_size, seqlen, settings.seed)
    dense_ppl = None
    if ppl_source:
        emit(Progress(0, settings.steps, "dense perplexity", time.perf_counter() - t0))
        model.to(device)  # perplexity runs where the weights are
        dense_ppl = asdict(cached_perplexity(model, tokenizer, ppl_source, ppl_seqlen, 8, ppl_windows, device,
                                             should_stop=stop))
        model.to("cpu")
    if stop():
        raise JobCancelled("shear was cancelled")
    emit(ShearStart(source_shape(model).to_dict(), shape.to_dict(), count_parameters(model),
                    parameter_count(model, shape), settings.steps))

    def on_step(event: ShearStep) -> None:
        emit(event)
        emit(Progress(event.step, event.steps, "mask learning", time.perf_counter() - t0))

    result = shear_model(model, tokens, shape, settings, on_step, stop, model_name=name)
    result.report.settings.update(data=list(data), seqlen=seqlen)
    if source_run is not None:
        result.report.settings["source_run"] = source_run.name
    sheared_ppl = None
    if ppl_source:
        emit(Progress(settings.steps, settings.steps, "perplexity of the cut model", time.perf_counter() - t0))
        model.to(device)
        sheared_ppl = asdict(cached_perplexity(model, tokenizer, ppl_source, ppl_seqlen, 8, ppl_windows, device,
                                               should_stop=stop))
        model.to("cpu")
        result.report.evaluation = {"dense_ppl": dense_ppl, "sheared_ppl": sheared_ppl}
    if stop():
        raise JobCancelled("shear was cancelled")
    emit(Progress(settings.steps, settings.steps, "saving the run", time.perf_counter() - t0))
    label = label or shear_label(name, shape)
    root = runs_root()
    folder = root / new_run_name(time.strftime("%Y%m%d-%H%M%S") + "-" + label, root)
    history = {"source": result.source.to_dict(), "target": shape.to_dict(), "kept_layers": result.kept_layers,
               "history": [asdict(e) for e in result.history]}

    def extra(tmp: Path) -> None:  # written into the folder before it appears
        write_meta(tmp, result.report, label)
        (tmp / "shear.json").write_text(json.dumps(history, indent=1))

    export_checkpoint(model, tokenizer, folder, result.report, extra=extra)
    if sheared_ppl is not None:  # stored with each model like any other measurement
        add_measurement(folder, "perplexity", sheared_ppl, device=str(device))
        add_measurement(source_run or dense_evaluations_folder(name), "perplexity", dense_ppl, device=str(device))
    POOL.put(str(folder), LoadedModel(model, tokenizer, str(folder), str(folder)), settings.device)
    last = result.history[-1]
    return ShearOutcome(read_run(folder), result.source, shape, result.kept_layers, result.report.params_before,
                        result.report.params_after, result.report.settings["tokens_seen"],
                        time.perf_counter() - t0, dict(last.expected), dense_ppl, sheared_ppl)
