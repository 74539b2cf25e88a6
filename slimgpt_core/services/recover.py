"""Recover: LoRA fine-tuning of a (pruned) model, merged and saved as a new run, with the perplexity before and
after; for the command line (`recover_to_folder`) and the studio (`recover_to_workspace`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimgpt_core.base.atomic import check_output_folder
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.shapes import check_context_length
from slimgpt_core.models import LoadedModel, load_model
from slimgpt_core.services.evaluate import perplexity
from slimgpt_core.training.distributed import load_for_training
from slimgpt_core.training.recover import (RecoverResult, check_recover_settings, load_source_report, recover,
                                           recovered_report, summary)
from slimgpt_core.training.settings import RecoverSettings
from slimgpt_core.workspace.store import add_measurement, read_run, save_run, save_run_at


def save_recovered_run(result: RecoverResult, tokenizer, out: str | Path, source_report=None, source: str = "",
                       overwrite: bool = False) -> Path:
    """A normal run folder (same loader, export and lm-eval path as every run), written all at once."""

    return save_run_at(result.model, tokenizer, recovered_report(result, source_report, source), out, overwrite)


def recover_to_folder(model: str, settings: RecoverSettings, out: str | Path, overwrite: bool = False,
                      dtype: str = "float32", callback: Callable | None = None) -> dict | None:
    """The command line's recover: checked before anything loads, trained, saved at `out`; a summary back (None
    in the processes of a torchrun job other than rank 0)."""
    out = check_output_folder(out, overwrite)
    check_recover_settings(settings)  # before loading anything
    loaded = load_for_training(model, dtype)  # under torchrun: weights on rank 0 only, meta shells elsewhere
    check_context_length(loaded.model.config, settings.seqlen, "--seqlen")
    result = recover(loaded.model, loaded.tokenizer, settings, callback)
    if result is None:  # a process other than rank 0 of a torchrun job: rank 0 saves the run
        return None
    save_recovered_run(result, loaded.tokenizer, out, load_source_report(loaded.path), loaded.path, overwrite)
    return {"out": str(out), "source": loaded.path, **summary(result)}


@dataclass
class RecoveryOutcome:
    """A recovery job's result as the studio shows it: the new run and the perplexities side by side."""
    run: object  # workspace.RunInfo of the recovered run
    ppl_before: dict | None
    ppl_after: dict | None
    dense_ppl: dict | None  # the source model's, same text and windows (None when it is not loaded)
    heldout: list[dict]


def recover_to_workspace(run_folder: str | Path, settings: RecoverSettings, label: str = "",
                         dense: LoadedModel | None = None, callback: Callable | None = None,
                         should_stop: Callable[[], bool] | None = None) -> RecoveryOutcome:
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
        dense_ppl = perplexity(dense.model, dense.tokenizer, settings.ppl_source, settings.ppl_seqlen,
                               settings.ppl_windows, 8, resolve_device(settings.device))
    for folder, ppl in ((source.path, result.ppl_before), (info.path, result.ppl_after)):
        if ppl is not None:  # stored with each run like any other measurement
            add_measurement(folder, "perplexity", ppl, device=result.device)
    return RecoveryOutcome(read_run(info.path), result.ppl_before, result.ppl_after, dense_ppl, result.heldout)
