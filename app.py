"""SlimGPT Studio: `streamlit run app.py`. This file only routes; pages live in pages/."""
import streamlit as st

from ui.state import init_state, sidebar

st.set_page_config(page_title="SlimGPT Studio", page_icon="✂️", layout="wide")
init_state()
page = st.navigation([
    st.Page("pages/model.py", title="Model", icon="📦", default=True),
    st.Page("pages/prune.py", title="Prune", icon="✂️"),
    st.Page("pages/inspect_runs.py", title="Inspect", icon="🔍"),
    st.Page("pages/evaluate.py", title="Evaluate", icon="📊"),
    st.Page("pages/export.py", title="Export", icon="💾"),
])
sidebar()
page.run()
