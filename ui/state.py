"""Session helpers shared by the pages: the loaded model (cached resource), runs, jobs, sidebar."""
from __future__ import annotations

import streamlit as st

from slimgpt_core.errors import SlimGPTError
from slimgpt_core.jobs import Job
from slimgpt_core.models import LoadedModel, load_model


@st.cache_resource(show_spinner=False, max_entries=3)
def cached_model(name: str, device: str, dtype: str) -> LoadedModel:
    return load_model(name, device, dtype)


def init_state() -> None:
    ss = st.session_state
    ss.setdefault("model_spec", None)  # (name, device, dtype)
    ss.setdefault("runs", {})  # id -> PruneRun
    ss.setdefault("current_run", None)
    ss.setdefault("jobs", {})  # name -> Job
    ss.setdefault("evals", {})  # key -> list[EvalResult]
    ss.setdefault("head_stats", {})  # key -> DenseStatistics
    ss.setdefault("exports", {})  # run id -> ExportResult


def current_model() -> LoadedModel | None:
    spec = st.session_state.get("model_spec")
    if spec is None:
        return None
    try:
        return cached_model(*spec)
    except SlimGPTError as exc:
        st.error(str(exc))
        return None


def job(name: str) -> Job | None:
    return st.session_state["jobs"].get(name)


def runs() -> dict:
    return st.session_state["runs"]


def current_run():
    rid = st.session_state.get("current_run")
    return runs().get(rid) if rid else None


def require_model() -> LoadedModel | None:
    loaded = current_model()
    if loaded is None:
        st.info("Load a model on the **Model** page first.")
    return loaded


def sidebar() -> None:
    with st.sidebar:
        st.markdown("### SlimGPT Studio")
        spec = st.session_state.get("model_spec")
        if spec:
            st.caption(f"**Model:** {spec[0]} · {spec[1]} · {spec[2]}")
        else:
            st.caption("**Model:** none loaded")
        run = current_run()
        if run is not None:
            r = run.report
            st.caption(f"**Run:** {run.label} · achieved {r.achieved_layer_ratio:.1%} of layer parameters")
        else:
            st.caption("**Run:** none yet")
        running = [name for name, j in st.session_state["jobs"].items() if j.running]
        if running:
            st.caption("**Working:** " + ", ".join(running))


def finished_job(name: str, cancel_label: str):
    """Draw a running job's progress (with a Cancel button) or its failure; return the Job once it is done."""
    j = job(name)
    if j is None:
        return None
    if j.running:
        progress = [e for e in j.events if e.kind == "progress"]
        last = progress[-1] if progress else None
        st.progress(last.layer / max(1, last.n_layers) if last else 0.0,
                    text=f"{last.phase} · {j.elapsed:.0f} s" if last else "starting…")
        if st.button(cancel_label):
            j.cancel()
        return None
    if j.state == "failed":
        st.error(j.error)
    elif j.state == "cancelled":
        st.warning("Cancelled.")
    return j if j.state == "done" else None


def require_runs() -> dict:
    """The session's runs and their labels; stops the page when there are none."""
    if not runs():
        st.info("No runs yet: prune on the **Prune** page first.")
        st.stop()
    return runs()
