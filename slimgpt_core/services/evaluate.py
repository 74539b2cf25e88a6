"""Evaluate: load → run → record. Perplexity, zero-shot tasks and speed of one or more models, measured the same
way for the command line and the studio, each measurement stored with its run (evaluations.json, with provenance)
as soon as it is taken, so a finished step survives a cancel or a restart."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.events import Progress
from slimgpt_core.base.shapes import count_parameters
from slimgpt_core.evaluation.evaluate import cached_perplexity
from slimgpt_core.evaluation.speed import measure_speed
from slimgpt_core.evaluation.zeroshot import zero_shot
from slimgpt_core.models import load_model
from slimgpt_core.workspace.store import META, add_measurement


@dataclass
class EvalPlan:
    """What to measure. The speed defaults are the studio's quick points; the command line passes its own."""
    ppl: str | None = None
    seqlen: int = 128
    windows: int | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    speed: bool = False
    speed_batches: tuple[int, ...] = (1, 4)
    speed_lengths: tuple[int, ...] = (128,)
    new_tokens: int = 16
    speed_repeats: int = 2
    batch_size: int = 8
    use_cache: bool = True

    def steps(self) -> list[str]:
        return (["perplexity"] if self.ppl else []) + list(self.tasks) + (["speed"] if self.speed else [])


@dataclass
class EvalResult:
    label: str
    perplexity: dict | None
    tasks: dict[str, dict]
    speed: dict | None
    parameters: int


def no_bar(desc: str, unit: str):
    return None


def perplexity(model, tokenizer, source: str, seqlen: int, windows: int | None, batch_size: int, device,
               bar=None, use_cache: bool = True, should_stop: Callable[[], bool] | None = None) -> dict:
    """One perplexity as a plain dict (cached per model fingerprint, text, length and windows)."""
    try:
        return asdict(cached_perplexity(model, tokenizer, source, seqlen, batch_size, windows, device,
                                        bar.update if bar is not None else None, should_stop=should_stop,
                                        use_cache=use_cache))
    finally:
        if bar is not None:
            bar.close()


def evaluate_model(label: str, model, tokenizer, plan: EvalPlan, device, record_to: Path | None = None,
                   step: Callable[[str], None] | None = None, bars: Callable = no_bar,
                   should_stop: Callable[[], bool] | None = None, speed_folder: str | None = None) -> EvalResult:
    """Measure one model (moved to `device` for the measurements, then back) and record each result in
    `record_to` when given. `step(what)` is called before each measurement, `bars(desc, unit)` makes a counter."""
    dev = resolve_device(device) if isinstance(device, str) else device
    home = next(model.parameters()).device
    model.to(dev)
    res = EvalResult(label, None, {}, None, count_parameters(model))
    announce = step or (lambda what: None)

    def record(kind: str, value: dict) -> None:
        if record_to is not None:
            add_measurement(record_to, kind, value, batch_size=plan.batch_size, device=str(dev),
                            parameters=res.parameters)

    try:
        if plan.ppl:
            announce("perplexity")
            res.perplexity = perplexity(model, tokenizer, plan.ppl, plan.seqlen, plan.windows, plan.batch_size, dev,
                                        bars(f"ppl {label}".strip(), "window"), plan.use_cache, should_stop)
            record("perplexity", res.perplexity)
        for task in plan.tasks:
            announce(task)
            bar = bars(f"{task} {label}", "task")
            try:
                res.tasks[task] = asdict(zero_shot(model, tokenizer, [task], plan.limit, plan.batch_size,
                                                   bar.update if bar is not None else None, should_stop,
                                                   plan.use_cache)[task])
            finally:
                if bar is not None:
                    bar.close()
            record("task", res.tasks[task])
        if plan.speed:
            announce("speed")
            res.speed = asdict(measure_speed(model, plan.speed_batches, plan.speed_lengths, plan.new_tokens,
                                             plan.speed_repeats, folder=speed_folder))
            record("speed", res.speed)
    finally:
        model.to(home)
    return res


def evaluate(models: dict[str, tuple], ppl_source: str | None, seqlen: int, max_windows: int | None,
             tasks: list[str], limit: int | None, speed: bool, device: str = "auto", batch_size: int = 8,
             callback: Callable | None = None, should_stop: Callable[[], bool] | None = None,
             record_to: dict[str, Path] | None = None) -> list[EvalResult]:
    """Evaluate several (model, tokenizer) pairs the same way (the studio's quick speed points); progress events
    name the model and step. With `record_to` {label: folder}, every measurement goes into that folder's
    evaluations.json at once."""
    plan = EvalPlan(ppl_source, seqlen, max_windows, list(tasks), limit, speed, batch_size=batch_size)
    dev = resolve_device(device)
    emit = callback or (lambda e: None)
    total, done = len(models) * len(plan.steps()), [0]
    results = []
    for label, (model, tokenizer) in models.items():
        def step(what: str, label=label) -> None:
            emit(Progress(done[0], total, f"{label}: {what}", 0.0))
            done[0] += 1
        results.append(evaluate_model(label, model, tokenizer, plan, dev, (record_to or {}).get(label), step,
                                      should_stop=should_stop))
    emit(Progress(total, total, "done", 0.0))
    return results


def is_run(folder: Path) -> bool:
    """A workspace run (its meta.json): the only folders measurements are written into, never someone's model."""
    return (Path(folder) / META).exists()


def evaluate_named(name: str, plan: EvalPlan, device: str = "auto", dtype: str = "auto",
                   bars: Callable = no_bar) -> dict:
    """The command line's evaluation of a model by name: loaded, measured, recorded with the run when it is one;
    a plain dict back (model, perplexity, tasks with their mean accuracy, speed)."""
    loaded = load_model(name, device, dtype)
    folder = Path(loaded.path)
    res = evaluate_model(name, loaded.model, loaded.tokenizer, plan, device, folder if is_run(folder) else None,
                         bars=bars, speed_folder=loaded.path)
    out: dict = {"model": name}
    if res.perplexity is not None:
        out["perplexity"] = res.perplexity
    if plan.tasks:
        out["tasks"] = res.tasks
        out["tasks_mean_acc"] = sum(r["acc"] for r in res.tasks.values()) / len(res.tasks)
    if res.speed is not None:
        out["speed"] = res.speed
    return out
