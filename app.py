"""SlimGPT Studio: `streamlit run app.py`. This file only routes; pages live in pages/."""
import streamlit as st

from ui.state import init_state, sidebar

st.set_page_config(page_title="SlimGPT Studio", page_icon=":material/content_cut:", layout="wide")
init_state()
page = st.navigation([
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/shear.py", title="Shear", icon=":material/compress:"),
    st.Page("pages/pretrain.py", title="Pretrain", icon=":material/school:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/folder_open:"),
    st.Page("pages/recover.py", title="Recover", icon=":material/healing:"),
    st.Page("pages/inspect_runs.py", title="Inspect", icon=":material/query_stats:"),
    st.Page("pages/accumulation.py", title="Accumulation", icon=":material/stacked_line_chart:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/leaderboard:"),
    st.Page("pages/side_by_side.py", title="Side by side", icon=":material/view_column:"),
    st.Page("pages/generate.py", title="Generate", icon=":material/chat:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
])
sidebar()
page.run()
