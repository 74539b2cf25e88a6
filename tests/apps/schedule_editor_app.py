"""The schedule editor alone, on a real model and its error curves: what tests/studio/browser/test_browser_editor.py drives.

Query parameters: model (stories260k | smollm2, default stories260k), curves (1 | 0). Every edit the server
receives is appended, as JSON, to the file named by SLIMGPT_EDITOR_LOG (when set) and shown on the page.
"""
import json
import os

import streamlit as st

from slimgpt_core.data import calibration_tokens
from slimgpt_core.models import load_model
from slimgpt_core.schedules.curves import error_curves
from slimgpt_core.schedules.editor_data import editor_payload
from slimgpt_core.schedules.schedule import layer_ratios
from ui.schedule_editor import apply_edit, dropped_edit, schedule_editor

TARGET = 0.3


@st.cache_resource
def model_and_curves(name: str):
    loaded = load_model(name, "cpu")
    tokens = calibration_tokens(loaded.tokenizer, "tinystories", 4, 64, 0)
    return loaded, error_curves(loaded.model, tokens, device="cpu")


ss = st.session_state
name = st.query_params.get("model", "stories260k")
with_curves = st.query_params.get("curves", "1") == "1"
loaded, curves = model_and_curves(name)
n = len(loaded.model.model.layers)
preset = layer_ratios(n, TARGET, "log", 4.0)
payload = editor_payload(loaded.model, curves if with_curves else None, preset, preset)
ss.setdefault("schedule", {"hr": list(preset), "fr": list(preset)})
ss.setdefault("received", [])


def on_edit() -> None:
    edit = dropped_edit()
    ss.received.append(edit)
    apply_edit(ss.schedule, edit)
    if os.environ.get("SLIMGPT_EDITOR_LOG"):
        with open(os.environ["SLIMGPT_EDITOR_LOG"], "a") as log:
            log.write(json.dumps(edit) + "\n")


st.markdown(f"### Schedule editor · {name}")
schedule_editor(payload, ss.schedule["hr"], ss.schedule["fr"], on_edit)
st.markdown(f"server received **{len(ss.received)}** edits")
st.code(json.dumps({"schedule": ss.schedule, "received": ss.received}), language="json")
