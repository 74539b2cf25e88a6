"""SlimGPT Studio: `streamlit run app.py`. This file only routes; pages live in studio_pages/.

Not in pages/: Streamlit treats a pages/ folder beside the main script as a multipage app of its own, so the first
session after a start showed (and, on a direct URL such as /runs, kept) that folder's file names as navigation and
ran the page without this script (no wide layout)."""
import streamlit as st

from ui.state import init_state, sidebar

st.set_page_config(page_title="SlimGPT Studio", page_icon=":material/content_cut:", layout="wide")
init_state()
page = st.navigation([
    st.Page("studio_pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("studio_pages/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("studio_pages/shear.py", title="Shear", icon=":material/compress:"),
    st.Page("studio_pages/pretrain.py", title="Pretrain", icon=":material/school:"),
    st.Page("studio_pages/runs.py", title="Runs", icon=":material/folder_open:"),
    st.Page("studio_pages/recover.py", title="Recover", icon=":material/healing:"),
    st.Page("studio_pages/inspect_runs.py", title="Inspect", icon=":material/query_stats:"),
    st.Page("studio_pages/accumulation.py", title="Accumulation", icon=":material/stacked_line_chart:"),
    st.Page("studio_pages/evaluate.py", title="Evaluate", icon=":material/leaderboard:"),
    st.Page("studio_pages/side_by_side.py", title="Side by side", icon=":material/view_column:"),
    st.Page("studio_pages/generate.py", title="Generate", icon=":material/chat:"),
    st.Page("studio_pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("studio_pages/export.py", title="Export", icon=":material/download:"),
], expanded=True)  # every page listed: collapsed, the navigation hides the last ones behind "View more"
sidebar()
page.run()
