"""LoRA recovery's result saved as a run."""
from __future__ import annotations

from pathlib import Path

from slimgpt_core.training.recover import RecoverResult, recovered_report
from slimgpt_core.workspace.store import save_run_at


def save_recovered_run(result: RecoverResult, tokenizer, out: str | Path, source_report=None, source: str = "",
                       overwrite: bool = False) -> Path:
    """A normal run folder (same loader, export and lm-eval path as every run), written all at once."""

    return save_run_at(result.model, tokenizer, recovered_report(result, source_report, source), out, overwrite)
