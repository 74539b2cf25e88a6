"""Shear: a model cut to a target shape (layers, KV groups, heads, FFN, hidden) by a registered shape method
(Sheared-LLaMA's learned masks, or Minitron's one-shot importance), for the command line (`shear_to_folder`) and
the studio (`shear_to_workspace`): load → check → data → dense perplexity → masks and cut → perplexity → save.

The source is never changed: the loaded model is copied, a run is read fresh from disk. Nothing is written until
the cut model is complete, and then all at once (a cancelled or failed job leaves no folder). Under torchrun
(docs/distributed.md) only rank 0 reads the weights, measures perplexity, reports progress and saves the run."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from slimgpt_core import data
from slimgpt_core.base import devices
from slimgpt_core.base.atomic import check_output_folder
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.events import Progress
from slimgpt_core.base.shapes import check_context_length, count_parameters
from slimgpt_core.methods import registry
from slimgpt_core.methods.shear.size import parameter_count
from slimgpt_core.methods.shear.target import Shape, resolve_target, source_shape
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.methods.shear.train import ShearResult, ShearStep
from slimgpt_core.models import LoadedModel, load_model
from slimgpt_core.services.evaluate import perplexity
from slimgpt_core.training.distributed import is_main, load_for_training, rank_world
from slimgpt_core.training.loop import training_bytes
from slimgpt_core.workspace.model_pool import POOL
from slimgpt_core.workspace.store import (add_measurement, dense_evaluations_folder, new_run_name, read_run, runs_root,
                                          save_run_at)

ABBREV = {"layers": "L", "kv_groups": "kv", "heads_per_group": "q/g", "ffn": "ffn", "hidden": "d"}


def describe_step(e: ShearStep) -> str:
    """One progress line: loss, each structure's expected size / target, λ₁ summed, tokens/s, ETA."""
    sizes = " ".join(f"{ABBREV[k]} {e.expected[k]:.1f}/{e.target[k]:.1f}" for k in ABBREV)
    lam = " ".join(f"{k}:{v[0]:+.1f},{v[1]:.1f}" for k, v in e.lambdas.items())
    return (f"step {e.step}/{e.steps} loss {e.loss:.3f} | {sizes} | λ {lam} | {e.tokens_per_s:.0f} tok/s "
            f"ETA {e.eta_s:.0f}s")


def training_tokens(tokenizer, sources: list[str], steps: int, batch_size: int, seqlen: int,
                    seed: int = 0) -> torch.Tensor:
    """Enough windows for `steps` micro-batches of `batch_size` sequences, an equal share from each source (a
    static mix; the same windows on every rank)."""

    if not sources:
        raise SlimGPTError("give at least one data source (--data c4,tinystories)")
    per_source = min(4096, math.ceil(steps * batch_size / len(sources)))
    return torch.cat([data.calibration_tokens(tokenizer, s, per_source, seqlen, seed) for s in sources])


def check_training_memory(model, batch_size: int, seqlen: int, device: torch.device, train_weights: bool) -> None:
    devices.check_free_memory(training_bytes(model, batch_size, seqlen, train_weights), device,
                              "mask learning needs about", "lower --batch-size or --seqlen, or pass --freeze-weights")


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


@dataclass
class ShearRequest:
    """What a shear is asked: the shape method, its settings, the data and the perplexity around it."""
    target: dict  # as --target takes it, already read
    settings: ShearSettings
    data: list[str]
    seqlen: int = 256
    method: str = "shear"
    nsamples: int = 128  # one-shot methods: calibration windows
    ppl: str | None = None
    ppl_seqlen: int = 128
    ppl_windows: int | None = None
    seqlen_name: str = "sequence length"  # how the refusal names the window length


@dataclass
class Sheared:
    """A finished shear held in memory before it is saved."""
    result: ShearResult
    shape: Shape
    dense_ppl: dict | None = None
    sheared_ppl: dict | None = None
    device: str = "cpu"
    model: object = None  # the cut model (the one passed in, or gathered from the ranks' shards)


def shear_label(model_name: str, target: Shape) -> str:
    return (f"{model_name} shear {target.layers}L {target.kv_groups}x{target.heads_per_group}h "
            f"ffn{target.ffn} d{target.hidden}")


def shear_loaded(model, tokenizer, name: str, request: ShearRequest, emit: Callable = lambda e: None,
                 stop: Callable[[], bool] = lambda: False) -> Sheared | None:
    """Check, draw the data, measure the dense perplexity, run the shape method, measure the cut model; in one
    process `model` is cut in place and left on the CPU. Under torchrun every rank calls this and rank 0 alone
    gets the result (None elsewhere)."""
    t0, settings = time.perf_counter(), request.settings
    method = registry.lookup(request.method, "shape")
    if rank_world()[1] > 1 and not method.trains:
        raise SlimGPTError(f"--method {request.method} is one-shot and runs in one process (not under torchrun)")
    emit = emit if is_main() else (lambda e: None)
    shape = resolve_target(request.target, model)
    check_context_length(model.config, request.seqlen, request.seqlen_name)
    device = resolve_device(settings.device)
    if method.trains:
        settings.validate()
        check_training_memory(model, settings.batch_size, request.seqlen, device, settings.train_weights)
    emit(Progress(0, settings.steps, "training data", time.perf_counter() - t0))
    steps, batch = (settings.steps, settings.batch_size * settings.grad_accumulation) if method.trains else (
        request.nsamples, 1)
    tokens = training_tokens(tokenizer, request.data, steps, batch, request.seqlen, settings.seed)
    out = Sheared(None, shape, device=str(device))
    if request.ppl and is_main():
        emit(Progress(0, settings.steps, "dense perplexity", time.perf_counter() - t0))
        out.dense_ppl = _perplexity(model, tokenizer, request, device, stop)
    if stop():
        raise JobCancelled("shear was cancelled")
    emit(ShearStart(source_shape(model).to_dict(), shape.to_dict(), count_parameters(model),
                    parameter_count(model, shape), settings.steps))

    def on_step(event: ShearStep) -> None:
        emit(event)
        emit(Progress(event.step, event.steps, "mask learning", time.perf_counter() - t0))

    out.result = method.function()(model, tokens, shape, settings, on_step, stop, model_name=name)
    if out.result is None:  # a process other than rank 0 of a torchrun job
        return None
    out.model = out.result.model if out.result.model is not None else model
    out.result.report.settings.update(data=list(request.data), seqlen=request.seqlen)
    if request.ppl:
        emit(Progress(settings.steps, settings.steps, "perplexity of the cut model", time.perf_counter() - t0))
        out.sheared_ppl = _perplexity(out.model, tokenizer, request, device, stop)
        out.result.report.evaluation = {"dense_ppl": out.dense_ppl, "sheared_ppl": out.sheared_ppl}
    if stop():
        raise JobCancelled("shear was cancelled")
    return out


def _perplexity(model, tokenizer, request: ShearRequest, device, stop) -> dict:
    model.to(device)  # perplexity runs where the weights are
    try:
        return perplexity(model, tokenizer, request.ppl, request.ppl_seqlen, request.ppl_windows, 8, device,
                          should_stop=stop)
    finally:
        model.to("cpu")


def save_shear_run(model, tokenizer, result: ShearResult, out: str | Path, overwrite: bool = False,
                   label: str = "") -> Path:
    """The checkpoint, report.json and meta.json like every run, plus shear.json: the step-by-step history."""

    history = {"source": result.source.to_dict(), "target": result.target.to_dict(), "kept_layers": result.kept_layers,
               "history": [asdict(e) for e in result.history]}

    def shear_json(tmp: Path) -> None:
        (tmp / "shear.json").write_text(json.dumps(history, indent=1))

    return save_run_at(model, tokenizer, result.report, out, overwrite, label, extra=shear_json)


def shear_to_folder(model_name: str, request: ShearRequest, out: str | Path, overwrite: bool = False,
                    dtype: str = "auto", callback: Callable | None = None) -> dict | None:
    """The command line's shear: a new run folder at `out`; a summary back (None in the processes of a torchrun
    job other than rank 0, which hold no weights until sharding and save nothing)."""
    out = check_output_folder(out, overwrite)
    if request.method == "shear":
        request.settings.validate()  # before loading anything
    loaded = load_for_training(model_name, dtype) if rank_world()[1] > 1 else load_model(
        model_name, request.settings.device, dtype)
    done = shear_loaded(loaded.model, loaded.tokenizer, loaded.name, request, callback or (lambda e: None))
    if done is None:
        return None
    result = done.result
    save_shear_run(done.model, loaded.tokenizer, result, out, overwrite)
    summary = {"out": str(out), "method": request.method, "shape": target_summary(result.target, result.source),
               "kept_layers": result.kept_layers, "params_before": result.report.params_before,
               "params_after": result.report.params_after, "seconds": round(result.report.total_seconds, 1)}
    if result.history:
        last = result.history[-1]
        summary.update(final_loss=round(last.loss, 4), tokens=result.report.settings["tokens_seen"],
                       expected_at_end={k: round(v, 2) for k, v in last.expected.items()})
    for key, value in (("dense_ppl", done.dense_ppl), ("sheared_ppl", done.sheared_ppl)):
        if value is not None:
            summary[key] = round(value["ppl"], 3)
    return summary


def shear_to_workspace(source: LoadedModel | str | Path, target: dict, settings: ShearSettings, data: list[str],
                       seqlen: int, ppl_source: str | None = "wikitext2", ppl_seqlen: int = 128,
                       ppl_windows: int | None = 16, label: str = "", callback: Callable | None = None,
                       should_stop: Callable[[], bool] | None = None) -> ShearOutcome:
    """Learn masks to `target` (a dict as `--target` takes, already read) on `data`, cut, and write the result
    into the workspace as a run. `source`: the loaded model (copied) or a run folder (loaded from disk)."""

    emit = callback or (lambda e: None)
    t0 = time.perf_counter()
    emit(Progress(0, settings.steps, "loading the source", 0.0))
    if isinstance(source, LoadedModel):
        model, tokenizer, name, source_run = copy.deepcopy(source.model), source.tokenizer, source.name, None
    else:
        loaded = load_model(str(source), "cpu")
        model, tokenizer, name, source_run = loaded.model, loaded.tokenizer, Path(source).name, Path(source)
    request = ShearRequest(target, settings, list(data), seqlen, ppl=ppl_source, ppl_seqlen=ppl_seqlen,
                           ppl_windows=ppl_windows)
    done = shear_loaded(model, tokenizer, name, request, emit, should_stop or (lambda: False))
    result, model = done.result, done.model
    if source_run is not None:
        result.report.settings["source_run"] = source_run.name
    emit(Progress(settings.steps, settings.steps, "saving the run", time.perf_counter() - t0))
    label = label or shear_label(name, done.shape)
    root = runs_root()
    folder = save_shear_run(model, tokenizer, result, root / new_run_name(
        time.strftime("%Y%m%d-%H%M%S") + "-" + label, root), label=label)
    if done.sheared_ppl is not None:  # stored with each model like any other measurement
        add_measurement(folder, "perplexity", done.sheared_ppl, device=done.device)
        add_measurement(source_run or dense_evaluations_folder(name), "perplexity", done.dense_ppl,
                        device=done.device)
    POOL.put(str(folder), LoadedModel(model, tokenizer, str(folder), str(folder)), settings.device)
    last = result.history[-1]
    return ShearOutcome(read_run(folder), result.source, done.shape, result.kept_layers, result.report.params_before,
                        result.report.params_after, result.report.settings["tokens_seen"],
                        time.perf_counter() - t0, dict(last.expected), done.dense_ppl, done.sheared_ppl)


def target_summary(target: Shape, source: Shape) -> dict:
    return {k: f"{getattr(source, k)}->{getattr(target, k)}" for k in ("layers", "kv_groups", "heads", "ffn", "hidden")}
