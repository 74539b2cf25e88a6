"""A finished run's per-layer allocation as a schedule: what LLM Surgeon's global threshold chose (issue 17), or
any heads-and-channels run's per-layer ratios, in the form the studio's schedule editor and
`--head-ratios`/`--ffn-ratios` take. Replaying it with SlimGPT keeps exactly the run's heads and channels."""
from __future__ import annotations

from dataclasses import dataclass

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport

EDITOR_MAX_RATIO = 0.95  # the schedule editor's sliders end here


@dataclass
class RunSchedule:
    heads_kept: list[int]  # query heads kept per layer
    ffn_kept: list[int]  # FFN channels kept per layer
    head_ratios: list[float]  # fraction of each layer's heads (KV groups) removed, capped at the editor's maximum
    ffn_ratios: list[float]
    capped: list[int]  # layers whose removed fraction exceeded the editor's maximum


def run_schedule(report: RunReport, max_ratio: float = EDITOR_MAX_RATIO) -> RunSchedule:
    """The run's per-layer ratios and kept counts (the report's own figures, not recomputed)."""
    s = report.settings
    if s.get("method") in ("surgeon", "kobd") and s.get("surgeon_units") == "rows":
        raise SlimGPTError("this run used rows-and-columns units: it zeroes weights and keeps every head and "
                           "channel, so its allocation is not a schedule")
    n = len(report.head_ratios)
    if n == 0 or len(report.ffn_ratios) != n or len(report.layers) != n:
        raise SlimGPTError("this run's report has no per-layer ratios and shapes to turn into a schedule")
    layers = sorted(report.layers, key=lambda e: e.layer)
    capped = [i for i in range(n) if max(report.head_ratios[i], report.ffn_ratios[i]) > max_ratio]
    return RunSchedule([e.heads for e in layers], [e.ffn for e in layers],
                       [min(r, max_ratio) for r in report.head_ratios], [min(r, max_ratio) for r in report.ffn_ratios],
                       capped)
