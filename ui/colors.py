"""One colour per run, the same on every page: Inspect, Side by side and the accumulation demo."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Iterable

# 20 colours far enough apart to tell lines apart (Tableau 10 and its lighter/darker companions)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#393b79", "#ad494a", "#637939", "#7b4173", "#e7969c", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#843c39")
DENSE_COLOR = "#222222"  # the dense model, where it is drawn beside runs


def _slot(name: str) -> int:
    """A stable start slot (not Python's hash, which changes between processes)."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % len(PALETTE)


@lru_cache(maxsize=64)
def _assign(names: tuple[str, ...]) -> dict[str, str]:
    """Each run its hash slot, or the next free one when an older run holds it: distinct colours for up to
    len(PALETTE) runs, and a run keeps its colour when others are added (unless it had to move for one)."""
    taken: dict[int, str] = {}
    out = {}
    for name in names:
        slot = _slot(name)
        for step in range(len(PALETTE)):
            if (slot + step) % len(PALETTE) not in taken:
                slot = (slot + step) % len(PALETTE)
                break
        taken[slot] = name
        out[name] = PALETTE[slot]
    return out


def run_color(name: str, workspace_runs: Iterable[str] = ()) -> str:
    """The colour of the run `name` (its folder name). Pass every run of the workspace as `workspace_runs`
    (the pages pass `ui.state.runs()`): colours are then distinct among them, assigned in folder-name order
    (creation time first), so every page that passes the workspace gets the same colour for the same run."""
    names = tuple(sorted(set(workspace_runs) | {name}))
    return _assign(names)[name]
