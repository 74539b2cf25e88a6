"""What the pages share: the loaded model, the workspace's runs, the server's jobs, the sidebar.

Nothing a user makes lives in a browser session: runs are folders in the workspace, jobs belong to the server
process (`slimgpt_core.workspace.jobs.BOARD`), models sit in its pool, and the loaded model is remembered in the
workspace. A reload, a second tab or a restart finds all of it again. Session state only holds what the user
is looking at (the chosen run, widget values)."""
from __future__ import annotations

from typing import Callable

import streamlit as st
from streamlit import runtime

from slimgpt_core.workspace import store as workspace
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.workspace.jobs import BOARD, Job, stop_promptly_on_signals
from slimgpt_core.workspace.model_pool import POOL
from slimgpt_core.models import LoadedModel


def init_state() -> None:
    if runtime.exists():  # a server (not a test harness): its main thread's loop installs the stop handlers
        runtime.get_instance().stopped.get_loop().call_soon_threadsafe(stop_promptly_on_signals)
    ss = st.session_state
    if ss.get("model_spec") is None:
        remembered = workspace.recall("model_spec")
        ss["model_spec"] = tuple(remembered) if remembered else None  # (name, device, dtype)
    ss.setdefault("current_run", None)  # a run's folder name
    ss.setdefault("head_stats", {})  # key -> DenseStatistics (cheap to rebuild from the statistics cache)
    ss.setdefault("seen_jobs", set())  # ids of finished jobs whose result this session already took in
    ss.setdefault("watched_jobs", set())  # ids of jobs this session started or saw unfinished
    ss.setdefault("dismissed_jobs", set())  # ids of jobs whose failure or cancellation the user dismissed


def load_dense_model(name: str, device: str, dtype: str) -> LoadedModel:
    """Load (or find in the pool) the model to prune, and remember it for every tab and the next start."""
    loaded = POOL.get(name, device, dtype)
    st.session_state["model_spec"] = (name, device, dtype)
    workspace.remember("model_spec", [name, device, dtype])
    return loaded


def current_model() -> LoadedModel | None:
    spec = st.session_state.get("model_spec")
    if spec is None:
        return None
    try:
        return POOL.get(*spec)
    except SlimGPTError as exc:
        st.error(str(exc))
        return None


def job(kind: str) -> Job | None:
    """The newest job of this kind in the server process, whoever started it."""
    return BOARD.latest(kind)


def submit(kind: str, fn, *args, job_label: str = "", heavy: bool = True, **kwargs) -> Job:
    started = BOARD.submit(kind, fn, *args, job_label=job_label, heavy=heavy, **kwargs)
    st.session_state.setdefault("watched_jobs", set()).add(started.id)  # also on pages that skip init_state
    return started


def job_alert(j: Job, cancelled_text: str = "Cancelled.") -> None:
    """A finished job's failure or cancellation, with a Dismiss button. It belongs to that job: shown only to the
    sessions that started it or saw it running (an old job's alert is no news to a new tab), gone once dismissed,
    and replaced when a newer job of its kind starts (pages draw only the newest)."""
    ss = st.session_state
    if (j.state not in ("failed", "cancelled") or j.id not in ss.setdefault("watched_jobs", set())
            or j.id in ss.setdefault("dismissed_jobs", set())):
        return
    if j.state == "failed":
        st.error(j.error)
    else:
        st.warning(cancelled_text)
    st.button("Dismiss", key=f"dismiss_{j.id}", on_click=ss["dismissed_jobs"].add, args=(j.id,))


def runs() -> dict[str, workspace.RunInfo]:
    """Every usable run in the workspace by folder name, newest first (listing reads small files only)."""
    return {r.name: r for r in workspace.list_runs() if r.broken is None}


@st.cache_data(show_spinner=False, max_entries=64)
def _report(path: str, mtime: float) -> RunReport:
    return RunReport.load(f"{path}/report.json")


def run_report(info: workspace.RunInfo) -> RunReport:
    path = info.path / "report.json"
    return _report(str(info.path), path.stat().st_mtime)


def run_model(info: workspace.RunInfo) -> LoadedModel:
    """A run's weights, from the pool (loaded on first use; a few stay in memory)."""
    spec = st.session_state.get("model_spec") or ("", "auto", "auto")
    return POOL.get(str(info.path), spec[1])


def current_run() -> workspace.RunInfo | None:
    all_runs = runs()
    rid = st.session_state.get("current_run")
    if rid in all_runs:
        return all_runs[rid]
    return next(iter(all_runs.values()), None)


def take_result(j: Job | None) -> bool:
    """True once per session for a finished job (to select what it made, say)."""
    if j is None or j.running or j.id in st.session_state["seen_jobs"]:
        return False
    st.session_state["seen_jobs"].add(j.id)
    return True


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
            ratio = run.summary.get("achieved_layer_ratio")
            achieved = f" · achieved {ratio:.1%} of layer parameters" if ratio is not None else ""
            st.caption(f"**Run:** {run.title}{achieved}")
        else:
            st.caption("**Run:** none yet")
        active = BOARD.running()
        if active:
            st.caption("**Working:** " + ", ".join(
                f"{j.name}{' (' + j.label + ')' if j.label else ''}{' · queued' if j.queued else ''}" for j in active))
        st.caption(f"Workspace: `{workspace.runs_root()}`")


def live_fragment(view: Callable[[], None], *kinds: str) -> None:
    """Draw `view` in a fragment that reruns every second while the newest job of any of `kinds` runs.

    A fragment's `run_every` is fixed when the page is drawn. So when those jobs have all ended while the
    fragment polls, the whole page is rerun once instead, and drawn again without polling: charts are not redrawn
    every second for nothing, and a Download button is not replaced under the user's click (which then starts no
    download). Rerunning the page before `view` draws the finished state means that state is drawn only once."""
    def running() -> bool:
        return any(j is not None and j.running for j in map(job, kinds))

    polling = running()  # after the page's buttons: a job one of them just started counts

    def fragment() -> None:
        if polling and not running():
            st.rerun(scope="app")
        view()

    st.fragment(run_every=1.0 if polling else None)(fragment)()


def bound_widget(make: Callable, key: str, stored, write: Callable[[str], None], *args, **kwargs):
    """A widget (`make`: st.number_input, a column's selectbox, …) showing `stored`, a value the page keeps outside
    the widget (the Prune form in the workspace, say); each change goes to `write(key)`, which stores
    `st.session_state[key]`.

    The value is set in the browser only when this session's widget does not hold `stored` yet (its first drawing,
    or another tab, a preset or a job's settings changed it): the browser applies a set value whenever its message
    arrives, so a value set in every run would let a run that began before the user's latest edit, its messages
    late on a busy machine, put the older value back, and the next edit would send that in as typed. Otherwise
    `stored` goes as the widget's default, which the browser uses only when it mounts the widget afresh (after a
    rerun dropped the messages of the run that set it, say)."""
    ss = st.session_state
    if key not in ss or ss[key] != stored:
        ss[key] = stored
    elif make.__name__ == "selectbox":
        options = list(args[1] if len(args) > 1 else kwargs["options"])
        kwargs["index"] = options.index(stored)
    else:
        kwargs["value"] = stored
    return make(*args, key=key, on_change=write, args=(key,), **kwargs)


def job_progress(j: Job, cancel_label: str, key: str, n_steps: int | None = None) -> None:
    """A running or queued job's progress bar and its Cancel button."""
    st.session_state.setdefault("watched_jobs", set()).add(j.id)
    if j.queued:
        st.progress(0.0, text=f"queued behind {', '.join(o.name for o in BOARD.running() if not o.queued) or 'another job'}"
                              " · waits for its turn")
    else:
        progress = [e for e in j.events if getattr(e, "kind", None) == "progress"]
        last = progress[-1] if progress else None
        total = n_steps or (max(1, last.n_layers) if last else 1)
        st.progress(min(1.0, last.layer / total) if last else 0.0,
                    text=f"{last.phase} · {j.elapsed:.0f} s" if last else "starting…")
    if st.button(cancel_label, key=key):
        j.cancel()


def finished_job(name: str, cancel_label: str):
    """Draw a running job's progress (with a Cancel button) or its failure; return the Job once it is done."""
    j = job(name)
    if j is None:
        return None
    if j.running:
        job_progress(j, cancel_label, key=f"cancel_{name}")
        return None
    job_alert(j)
    return j if j.state == "done" else None


def require_runs() -> dict[str, workspace.RunInfo]:
    """The workspace's runs; stops the page when there are none."""
    all_runs = runs()
    if not all_runs:
        st.info("No runs yet: prune on the **Prune** page first (or write one with `prune --out` into the "
                f"workspace, `{workspace.runs_root()}`).")
        st.stop()
    return all_runs
