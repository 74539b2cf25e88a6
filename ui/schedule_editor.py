"""The per-layer schedule editor: a Streamlit bidirectional component (components v2) whose JS draws the bars, the
preset ghost, the predicted errors, the sensitivity map and the parameter count, and recomputes them in the browser
while a bar moves. The page hears of an edit once, when the drag or key press ends: `on_edit` runs, and
`dropped_edit()` holds {"hr": [[layer, ratio], …], "fr": […], "seq": n} for `apply_edit`.

The JS and CSS live in ui/schedule_editor/ and are sent inline (nothing fetched at run time, no build step).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import streamlit as st

ASSETS = Path(__file__).with_suffix("")  # ui/schedule_editor/
EDITOR_KEY = "schedule_editor"
MAX_RATIO = 0.95  # the old sliders' range, and the JS's

_mount = st.components.v2.component(
    "slimgpt_schedule_editor",
    html='<div class="slimgpt-editor"></div>',
    css=(ASSETS / "editor.css").read_text(encoding="utf-8"),
    js=(ASSETS / "editor.js").read_text(encoding="utf-8"),
)


def schedule_editor(payload: dict, head_ratios: Sequence[float], ffn_ratios: Sequence[float],
                    on_edit: Callable[[], None], key: str = EDITOR_KEY):
    """Draw the editor on `payload` (slimgpt_core.schedules.editor_data.editor_payload) at this schedule."""
    data = {**payload, "hr": [float(r) for r in head_ratios], "fr": [float(r) for r in ffn_ratios],
            "acked": st.session_state.get(f"{key}_acked", 0)}
    return _mount(key=key, data=data, on_edit_change=on_edit)


def dropped_edit(key: str = EDITOR_KEY) -> dict | None:
    """The edit that came with this rerun (read it in the `on_edit` callback, then apply it). Its sequence number
    goes back to the browser with the next drawing: the edits up to it are in the schedule, and the browser stops
    repeating them in its messages."""
    state = st.session_state.get(key)
    edit = state.get("edit") if state else None
    if isinstance(edit, dict) and isinstance(edit.get("seq"), int):
        st.session_state[f"{key}_acked"] = edit["seq"]
    return edit


def apply_edit(schedule: dict, edit: dict | None) -> int:
    """Write an edit's ratios into `schedule` ({"hr": [...], "fr": [...]}, in place); returns how many it wrote.
    Entries for layers the schedule does not have (an edit sent against a previous model) are left out."""
    written = 0
    for kind in ("hr", "fr"):
        for entry in (edit or {}).get(kind) or ():
            try:
                layer, ratio = int(entry[0]), float(entry[1])
            except (TypeError, ValueError, IndexError):
                continue
            if 0 <= layer < len(schedule[kind]) and math.isfinite(ratio) and 0.0 <= ratio <= MAX_RATIO:
                schedule[kind][layer] = ratio
                written += 1
    return written
