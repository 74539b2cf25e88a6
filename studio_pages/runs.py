"""The workspace: every run from the studio and the command line, newest first; rename, annotate, delete."""
import time

import pandas as pd
import streamlit as st

from slimgpt_core.workspace import store as workspace
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.workspace.model_pool import POOL

st.title("Runs")
root = workspace.runs_root()
st.caption(f"Workspace `{root}` (set `SLIMGPT_RUNS` to move it). Runs written there by `prune --out` appear here "
           "as soon as they are finished.")
listed = workspace.list_runs(root)
if not listed:
    st.info("No runs yet: prune on the **Prune** page first (or write one with `prune --out` into the workspace).")
    st.stop()


def row(r: workspace.RunInfo) -> dict:
    s, ppl = r.summary, r.perplexity
    return {"run": r.name, "label": r.label, "model": s.get("model", ""), "method": " + ".join([s.get("method", "")] + s.get("trained", [])),
            "schedule": s.get("schedule", ""),
            "achieved (layers)": None if s.get("achieved_layer_ratio") is None else round(s["achieved_layer_ratio"], 4),
            "params (M)": None if s.get("params_after") is None else round(s["params_after"] / 1e6, 3),
            "perplexity": None if ppl is None else f"{ppl['ppl']:.2f} ({ppl['dataset']}, {ppl['seqlen']}×{ppl['windows']})",
            "size (MB)": round(r.size_bytes / 2**20, 1),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)),
            "status": "ok" if r.broken is None else f"broken: {r.broken}"}


st.dataframe(pd.DataFrame([row(r) for r in listed]), hide_index=True, key="runs_table")
names = [r.name for r in listed]
by_name = {r.name: r for r in listed}
if "runs_pick_next" in st.session_state:  # the run just relabelled or renamed stays chosen (its title changed)
    st.session_state.runs_pick = st.session_state.pop("runs_pick_next")
default = st.session_state.get("current_run")
name = st.selectbox("Run", names, index=names.index(default) if default in names else 0, key="runs_pick",
                    format_func=lambda n: by_name[n].title)
run = by_name[name]
s, ppl = run.summary, run.perplexity
if not run.broken:
    facts = [f"model {s.get('model', '?')}", f"method {s.get('method', '?')}", f"schedule {s.get('schedule', '?')}"]
    if s.get("achieved_layer_ratio") is not None:
        facts.append(f"achieved {s['achieved_layer_ratio']:.1%} of layer parameters")
    if ppl is not None:
        facts.append(f"perplexity {ppl['ppl']:.2f} ({ppl['dataset']}, {ppl['windows']} windows × {ppl['seqlen']})")
    facts.append(f"{len(run.evaluations)} stored measurement(s)")
    st.caption(f"**{run.title}** · " + " · ".join(facts))
if run.broken:
    st.warning(f"This folder is not a usable run: {run.broken}. It is listed so you can delete it.")

with st.form(f"meta_{name}"):
    label = st.text_input("Label", run.label, key=f"label_{name}")
    notes = st.text_area("Notes", run.notes, key=f"notes_{name}")
    if st.form_submit_button("Save label and notes") and not run.broken:
        workspace.update_meta(name, root, label=label, notes=notes)
        st.session_state.runs_pick_next = name
        st.rerun()

c1, c2 = st.columns(2)
with c1:
    new_name = st.text_input("Rename the folder to", name, key=f"rename_{name}")
    if st.button("Rename", disabled=new_name == name):
        try:
            info = workspace.rename_run(name, new_name, root)
        except SlimGPTError as exc:
            st.error(str(exc))
        else:
            POOL.forget(str(run.path))
            st.session_state.current_run = info.name
            st.session_state.runs_pick_next = info.name
            st.rerun()
with c2:
    sure = st.checkbox(f"Yes, delete **{name}** from disk", key=f"sure_{name}")
    if st.button("Delete run", type="primary", disabled=not sure):
        POOL.forget(str(run.path))
        workspace.delete_run(name, root)
        st.session_state.current_run = None
        st.rerun()
if st.button("Open in the other pages", disabled=bool(run.broken)):
    st.session_state.current_run = name
    st.rerun()
