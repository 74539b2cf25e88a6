"""Zero-shot multiple-choice tasks of the SlimGPT paper through lm-eval 0.4.x on an in-memory model.

Offline, the tasks come from the asset folder's JSONL files: task YAMLs are written at run time (data_files
must be absolute). Online (no asset files), lm-eval's standard task definitions and hub datasets are used."""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from slimgpt_core.base.choices import parse_choices
from slimgpt_core.base import assets
from slimgpt_core.base.cache import lookup_json, model_fingerprint, store_json
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.shapes import context_length
from slimgpt_core.models import require_hub

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_DOC_TO_TEXT = {"boolq": "{{query}}\nAnswer:", "arc_easy": "{{query}}\nAnswer:", "arc_challenge": "{{query}}\nAnswer:",
                "piqa": "{{query}}Answer:", "hellaswag": "{{query}}", "openbookqa": "{{query}}"}


@dataclass
class TaskResult:
    task: str
    acc: float
    acc_norm: float | None
    acc_stderr: float | None
    n: int  # documents scored
    limit: int | None
    source: str  # "offline:<file>" or "lm-eval standard task"
    seconds: float


def parse_tasks(text: str | list[str]) -> list[str]:
    return parse_choices(text, TASKS, "task")


def _task_yaml(task: str, data_file: Path, name: str | None = None) -> str:
    lines = [f"task: {name or task}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    validation: {str(data_file)!r}", "validation_split: validation", "output_type: multiple_choice"]
    if task == "winogrande":  # partial scoring: each option is a context, the continuation is scored
        lines += ["doc_to_text: gold", "doc_to_target: continuation", "doc_to_choice: context_options"]
    else:
        lines += [f"doc_to_text: {_DOC_TO_TEXT[task]!r}", "doc_to_target: gold", "doc_to_choice: choices"]
    lines += ["metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
              "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true", "metadata:",
              "  version: 1.0"]
    return "\n".join(lines) + "\n"


def write_task_yamls(folder: str | Path, tasks=TASKS, prefix: str = "") -> list[str]:
    """Task YAMLs over the offline asset files, for lm-eval's `--include_path`; returns the task names."""
    names = []
    for task in tasks:
        path = task_source(task)
        if path is None:
            raise SlimGPTError(f"offline data for {task} not found under the asset root: set {assets.ENV_VAR}")
        Path(folder, f"{prefix}{task}.yaml").write_text(_task_yaml(task, path, f"{prefix}{task}"))
        names.append(f"{prefix}{task}")
    return names


def task_source(task: str) -> Path | None:
    return assets.asset_path("data", "commonsense", f"{task}.jsonl")


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
              progress: Callable[[int, int, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None, use_cache: bool = True) -> dict[str, TaskResult]:
    """Evaluate each task in turn (progress per task); acc and acc_norm per task.

    Results are cached per (model fingerprint, task, limit, task source)."""


    tasks = parse_tasks(tasks)
    results: dict[str, TaskResult] = {}
    keys = {}
    for task in tasks:
        path = task_source(task)
        # v2: results carry lm-eval's standard error of acc
        keys[task] = f"task-v2|{model_fingerprint(model)}|{task}|{limit}|{path.name if path else 'standard'}"
        hit = lookup_json("results", keys[task]) if use_cache else None
        if hit is not None:
            results[task] = TaskResult(**hit)
    todo = [t for t in tasks if t not in results]
    if todo:
        fresh = _zero_shot(model, tokenizer, todo, limit, batch_size, progress, should_stop)
        for task in todo:
            results[task] = fresh[task]
            if use_cache:
                store_json("results", keys[task], asdict(fresh[task]))
    elif progress is not None:
        progress(len(tasks), len(tasks), "done")
    return {t: results[t] for t in tasks}


def _zero_shot(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int,
               progress: Callable[[int, int, str], None] | None,
               should_stop: Callable[[], bool] | None) -> dict[str, TaskResult]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise SlimGPTError(f"--limit must be >= 1, got {limit}")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-document truncation notes drown progress
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              max_length=context_length(model.config), truncation=True)
    results: dict[str, TaskResult] = {}
    with tempfile.TemporaryDirectory(prefix="slimgpt-tasks-") as folder:
        offline = {t: task_source(t) for t in tasks}
        for t, path in offline.items():
            if path is not None:
                Path(folder, f"{t}.yaml").write_text(_task_yaml(t, path))
        local_manager = TaskManager(include_path=folder, include_defaults=False) if any(offline.values()) else None
        for i, task in enumerate(tasks):
            if should_stop is not None and should_stop():
                raise JobCancelled("evaluation was cancelled")
            if progress is not None:
                progress(i, len(tasks), task)
            if offline[task] is not None:
                manager, source = local_manager, f"offline:{offline[task].name}"
            else:
                require_hub(f"the {task} dataset")
                manager, source = TaskManager(), "lm-eval standard task"
            t0 = time.perf_counter()
            # bootstrap_iters=0 would drop the standard errors; acc's is lm-eval's closed form (no resampling)
            out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, log_samples=False,
                                  bootstrap_iters=1, verbosity="WARNING")
            metrics = out["results"][task]
            results[task] = TaskResult(task, float(metrics["acc,none"]), _maybe(metrics.get("acc_norm,none")),
                                       _maybe(metrics.get("acc_stderr,none")), int(out["n-samples"][task]["effective"]),
                                       limit, source, time.perf_counter() - t0)
        if progress is not None:
            progress(len(tasks), len(tasks), "done")
    return results


def _maybe(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
