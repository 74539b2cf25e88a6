"""Methods and ablations side by side: run a grid (variants × ratios) and plot it."""
from dataclasses import asdict

import pandas as pd
import streamlit as st

from slimgpt_core.services.compare import VARIANTS, figures, run_grid
from slimgpt_core.evaluation.zeroshot import TASKS
from ui.state import finished_job, job, live_fragment, require_model, submit

st.title("Compare")
loaded = require_model()
if loaded is None:
    st.stop()
ss = st.session_state
st.caption("Every variant prunes a fresh copy of the loaded model with the same calibration and is evaluated the "
           "same way. Same schedule ⇒ same achieved ratio, so the numbers compare like with like.")
variants = st.multiselect("Variants", list(VARIANTS), default=["slimgpt", "magnitude", "wanda-sp", "slimgpt-nocomp"],
                          format_func=lambda v: f"{v} — {VARIANTS[v][1]}", key="cmp_variants")
c1, c2, c3, c4 = st.columns(4)
ratios = c1.multiselect("Ratios", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], default=[0.2, 0.5], key="cmp_ratios")
calib = c2.selectbox("Calibration", ["c4", "wikitext2", "tinystories"], key="cmp_calib")
nsamples = c3.number_input("Samples", 1, 1024, 16, key="cmp_nsamples")
context = getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048
seqlen = c4.number_input("Sequence length", 16, int(context), min(128, int(context)), step=16, key="cmp_seqlen")
e1, e2, e3, e4 = st.columns(4)
ppl = e1.selectbox("Perplexity text", ["wikitext2", "tinystories", "c4"], key="cmp_ppl")
windows = e2.number_input("Windows", 1, 100000, 32, key="cmp_windows")
tasks = e3.multiselect("Tasks", list(TASKS), default=[], key="cmp_tasks")
limit = e4.number_input("Limit per task", 1, 100000, 50, key="cmp_limit")

if st.button("Run grid", type="primary", disabled=bool(job("compare") and job("compare").running)
             or not variants or not ratios):
    submit("compare", run_grid, ss.model_spec[0], sorted(ratios), variants, calib, int(nsamples), int(seqlen), 0,
           ppl, 128, int(windows), tasks, int(limit), device=ss.model_spec[1],
           job_label=f"{len(variants)} variants × {len(ratios)} ratios")


def grid_view() -> None:
    cj = finished_job("compare", "Cancel grid")
    if cj is None:
        return
    rows = cj.result
    if rows and rows[0].dense_ppl is not None:
        st.caption(f"Dense model: perplexity {rows[0].dense_ppl:.2f}")
    st.dataframe(pd.DataFrame([{**{k: v for k, v in asdict(r).items() if k != "tasks"}, **r.tasks} for r in rows]),
                 hide_index=True)
    for name, fig in figures(rows).items():
        st.plotly_chart(fig, key=f"cmp_{name}")


live_fragment(grid_view, "compare")
