"""Continued pre-training: a run trained on a mix of domains and saved as a new run, for the command line
(`pretrain_to_folder`) and the studio (`pretrain_to_workspace`, with progress events and cancellation).

The source run is read fresh from disk and never changed. The teacher and the reference (the model whose held-out
loss per domain the mix is steered against) default to the model the run was pruned from, as the command line's
`--teacher source` / `--reference source` do. Nothing is written until training has finished."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimgpt_core.base.atomic import check_output_folder
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.events import Progress
from slimgpt_core.base.shapes import check_context_length
from slimgpt_core.models import LoadedModel, load_config, load_model
from slimgpt_core.training.distributed import load_for_training
from slimgpt_core.training.pretrain import (PretrainResult, TEXTS, check_pretrain_settings, pretrain, pretrained_report,
                                            summary)
from slimgpt_core.training.recover import load_source_report
from slimgpt_core.training.settings import PretrainSettings
from slimgpt_core.workspace.model_pool import POOL
from slimgpt_core.workspace.store import add_measurement, new_run_name, read_run, runs_root, save_run_at


@dataclass
class PretrainOutcome:
    """A finished continued pre-training job: the new run and what it measured."""
    run: object  # workspace.RunInfo
    source_model: str | None  # the model the source run was pruned from (reference / teacher), when known
    teacher: str | None
    reference_source: str
    domain_loss_before: dict[str, float]
    domain_loss_after: dict[str, float]
    reference: dict[str, float]
    weights_final: dict[str, float]
    ppl_before: dict[str, dict]
    ppl_after: dict[str, dict]
    tokens_seen: int
    seconds: float


def load_companion(name: str, vocab_size: int, what: str, dtype: str = "auto"):
    """A teacher or reference model, refused before its weights load when its vocabulary differs."""

    vocab = load_config(name)[0].vocab_size
    if vocab != vocab_size:
        raise SlimGPTError(f"the {what}'s vocabulary ({vocab} tokens, {name}) differs from the model's ({vocab_size}): "
                           "it needs the same tokenizer")
    return load_model(name, "cpu", dtype).model


def pretrain_to_workspace(source: str | Path, settings: PretrainSettings, teacher: str | None = None,
                          label: str = "", callback: Callable | None = None,
                          should_stop: Callable[[], bool] | None = None) -> PretrainOutcome:
    """Train the run at `source` on `settings.data`'s mix (dynamic batch loading when asked) and save the result as
    a new run. `teacher`: None, "source" (the model the run was pruned from) or a model path/name."""

    check_pretrain_settings(settings)  # before loading anything
    emit = callback or (lambda e: None)
    stop = should_stop or (lambda: False)
    t0 = time.perf_counter()
    emit(Progress(0, settings.steps, "loading the run", 0.0))
    loaded = load_model(str(source), "cpu")
    check_context_length(loaded.model.config, settings.seqlen)
    report = load_source_report(loaded.path)
    source_model = report.model if report is not None and report.model else None
    if teacher == "source":
        if source_model is None:
            raise SlimGPTError(f"run {Path(source).name} does not name the model it was pruned from: choose a "
                               "teacher model or none")
        teacher = source_model
    vocab = loaded.model.config.vocab_size
    companions: dict[str, object] = {}
    for name, what in ((source_model, "reference"), (teacher, "teacher")):
        if name is not None and name not in companions:
            emit(Progress(0, settings.steps, f"loading the {what}", time.perf_counter() - t0))
            companions[name] = load_companion(name, vocab, what)
    if stop():
        raise JobCancelled("continued pre-training was cancelled")

    def forward(event) -> None:
        emit(event)
        if getattr(event, "kind", None) == "pretrain-step":
            emit(Progress(event.step, event.steps, "training", time.perf_counter() - t0))
        elif getattr(event, "kind", None) == "pretrain-phase" and event.phase != "train":
            emit(Progress(0, settings.steps, event.phase, time.perf_counter() - t0))

    result = pretrain(loaded.model, loaded.tokenizer, settings, companions.get(source_model),
                      companions.get(teacher), forward, stop, reference_name=source_model or "",
                      teacher_name=teacher or "")
    if stop():
        raise JobCancelled("continued pre-training was cancelled")
    emit(Progress(settings.steps, settings.steps, "saving the run", time.perf_counter() - t0))
    label = label or f"{Path(source).name} pretrain {settings.steps}"
    root = runs_root()
    folder = root / new_run_name(time.strftime("%Y%m%d-%H%M%S") + "-" + label, root)
    save_pretrained_run(result, loaded.tokenizer, folder, report, str(source), label=label)
    for value in result.ppl_after.values():  # stored with the run like any other measurement
        add_measurement(folder, "perplexity", value, device=result.device)
    POOL.put(str(folder), LoadedModel(result.model, loaded.tokenizer, str(folder), str(folder)), settings.device)
    return PretrainOutcome(read_run(folder), source_model, teacher, result.reference_source, result.mix[0]["losses"],
                           result.mix[-1]["losses"], result.reference, result.mix[-1]["weights"], result.ppl_before,
                           result.ppl_after, result.tokens_seen, time.perf_counter() - t0)


def save_pretrained_run(result: PretrainResult, tokenizer, out: str | Path, source_report=None, source: str = "",
                        overwrite: bool = False, label: str = "") -> Path:
    """A normal run folder (loader, studio, evaluation, export as every run's), written all at once; the
    perplexities after training are stored as the run's measurements (evaluations.json, with provenance)."""

    report = pretrained_report(result, source_report, source)

    def measurements(tmp: Path) -> None:
        for name, value in result.ppl_after.items():
            text = TEXTS.get(name, name)
            add_measurement(tmp, "perplexity", value, batch_size=8, device=result.device, text=text,
                            measured_by="pretrain (after training)")

    return save_run_at(result.model, tokenizer, report, out, overwrite, label, extra=measurements)


def pretrain_to_folder(model: str, settings: PretrainSettings, out: str | Path | None = None,
                       teacher: str | None = None, reference: str = "source", dtype: str = "float32",
                       overwrite: bool = False, label: str = "", callback: Callable | None = None) -> dict | None:
    """The command line's pretrain: checked before anything loads, trained against the reference (and teacher),
    saved at `out` (default: a new workspace run); a summary back. "source" names the model the run was pruned
    from."""
    check_pretrain_settings(settings)  # before loading anything
    out = check_output_folder(out or runs_root() / new_run_name(f"{Path(model).stem}-pretrain-{settings.steps}"),
                              overwrite)
    loaded = load_for_training(model, dtype)  # under torchrun: weights on rank 0 only, meta shells elsewhere
    check_context_length(loaded.model.config, settings.seqlen, "--seqlen")
    report = load_source_report(loaded.path)
    source = report.model if report is not None and report.model else None
    companions: dict[str, object] = {}

    def companion(name: str, what: str):
        if name == "source":
            if source is None:
                raise SlimGPTError(f"{model} has no report naming the model it was pruned from: give --{what} "
                                   "as a model")
            name = source
        if name not in companions:
            companions[name] = load_companion(name, loaded.model.config.vocab_size, what, dtype)
        return name, companions[name]

    teacher_name, teacher_model = companion(teacher, "teacher") if teacher else (None, None)
    reference_name, reference_model = (None, None)
    if reference != "source" or source is not None:
        reference_name, reference_model = companion(reference, "reference")
    result = pretrain(loaded.model, loaded.tokenizer, settings, reference_model, teacher_model, callback,
                      reference_name=reference_name or "", teacher_name=teacher_name or "")
    if result is None:  # a process other than rank 0 of a torchrun job: rank 0 saves the run
        return None
    save_pretrained_run(result, loaded.tokenizer, out, report, loaded.path, overwrite, label)
    return {"out": str(out), "source": loaded.path, **summary(result)}
