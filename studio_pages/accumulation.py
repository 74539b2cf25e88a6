"""The error-accumulation demo: at one budget, SlimGPT (sequential, log) beside its dense-input twin and the uniform
schedule, each profiled on held-out text (own vs inherited error per layer), with perplexity and KL."""
import streamlit as st

from slimgpt_core.services.accumulation import (PROFILED, DemoConfig, demo_entries, inherited, run_demo, story,
                                                  twin_differences)
from ui import charts
from ui.colors import DENSE_COLOR, run_color
from ui.prune_form import load_form
from ui.state import (bound_widget, job, job_progress, live_fragment, require_model, run_report, runs, submit,
                      take_result)

ss = st.session_state
st.title("Error accumulation")
loaded = require_model()
if loaded is None:
    st.stop()

# the settings live in plain session state (widget state is dropped when the user visits another page)
context = int(getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048)
prune_target = float(load_form().target_ratio)  # the Prune page's budget (kept in the workspace)
DEFAULTS = {"acc_ratio": prune_target, "acc_calib": "c4",
            "acc_nsamples": 8, "acc_seqlen": min(128, context), "acc_seed": 0, "acc_heldout": "wikitext2",
            "acc_eval_seqlen": min(128, context), "acc_windows": 32, "acc_uniform_twin": True}
ss.setdefault("acc_settings", dict(DEFAULTS))
if prune_target != ss.get("acc_prune_target"):  # a new budget on the Prune page
    ss.acc_prune_target = ss.acc_settings["acc_ratio"] = float(prune_target)
a = ss.acc_settings


def keep(key: str) -> None:
    ss.acc_settings[key] = ss[key]


def widget(make, key: str, *args, **kwargs):
    return bound_widget(make, key, a[key], keep, *args, **kwargs)


presenter = st.toggle("Presenter mode", key="acc_presenter",
                      help="larger type, one chart per screen, the story in the captions")
with st.expander("Budget, calibration and held-out text", expanded=False):
    c1, c2, c3, c4, c5 = st.columns(5)
    widget(c1.slider, "acc_ratio", "Budget (mean ratio removed)", 0.05, 0.8, step=0.01,
           help="every run of the demo removes this mean ratio (starts at the Prune page's)")
    widget(c2.selectbox, "acc_calib", "Calibration text", ["c4", "wikitext2", "tinystories"])
    widget(c3.number_input, "acc_nsamples", "Samples", 1, 1024)
    widget(c4.number_input, "acc_seqlen", "Sequence length", 16, context, step=16)
    widget(c5.number_input, "acc_seed", "Seed", 0, 10**6)
    h1, h2, h3, h4 = st.columns(4)
    widget(h1.selectbox, "acc_heldout", "Held-out text", ["wikitext2", "c4", "tinystories"],
           help="its first windows; never the calibration windows")
    widget(h2.number_input, "acc_eval_seqlen", "Window length", 16, context, step=16)
    widget(h3.number_input, "acc_windows", "Windows", 1, 4096)
    widget(h4.checkbox, "acc_uniform_twin", "Also dense inputs, uniform")

config = DemoConfig(ratio=round(float(a["acc_ratio"]), 4), calib=a["acc_calib"], nsamples=int(a["acc_nsamples"]),
                    seqlen=int(a["acc_seqlen"]), seed=int(a["acc_seed"]), heldout=a["acc_heldout"],
                    eval_seqlen=int(a["acc_eval_seqlen"]), windows=int(a["acc_windows"]),
                    uniform_twin=bool(a["acc_uniform_twin"]), device=ss.model_spec[1])
all_runs = runs()
entries = demo_entries(loaded.model, loaded.name, config,
                       [(info, run_report(info)) for info in all_runs.values() if (info.path / "report.json").exists()])
missing = [e.run.title for e in entries if e.found is None]
unprofiled = [e.run.title for e in entries if e.found is not None and e.profile is None]
demo_job = job("accumulation")
b1, b2 = st.columns([1, 3])
busy = bool(demo_job and demo_job.running)
if b1.button("Run the demo", type="primary", disabled=busy or not (missing or unprofiled)):
    submit("accumulation", run_demo, loaded, config, job_label=f"{loaded.name} {config.ratio:.0%}")
if missing or unprofiled:
    b2.caption(f"At {config.ratio:.0%}: "
               + "; ".join(filter(None, [f"to prune: {', '.join(missing)}" if missing else "",
                                         f"to profile: {', '.join(unprofiled)}" if unprofiled else ""]))
               + ". Runs already in the workspace with identical settings are reused.")
else:
    b2.caption(f"Every run of the demo at {config.ratio:.0%} is in the workspace and profiled on {config.heldout} "
               f"({config.windows} × {config.eval_seqlen} tokens).")


def demo_status() -> None:
    j = job("accumulation")
    if j is None:
        return
    if j.running:
        job_progress(j, "Cancel the demo", "cancel_accumulation")
        profiled = sum(1 for e in list(j.events) if getattr(e, "phase", "").endswith(PROFILED))
        seen = ss.get("acc_profiled_seen", (j.id, 0))
        if profiled != (seen[1] if seen[0] == j.id else 0):  # a run was measured: draw it now
            ss.acc_profiled_seen = (j.id, profiled)
            st.rerun(scope="app")
        return
    if j.state == "failed":
        st.error(j.error)  # drawn on every run, not only once: a rerun would wipe it
    elif j.state == "cancelled":
        st.warning("The demo was cancelled; the runs and profiles it finished are kept.")
    if take_result(j):  # once: the page draws what the job made
        st.rerun(scope="app")


live_fragment(demo_status, "accumulation")

shown = [e for e in entries if e.profile is not None]
if not shown:
    st.info("**Run the demo** prunes the runs the story needs at this budget (SlimGPT's sequential log schedule, its "
            "dense-input twin, the uniform schedule) and measures each on held-out text.")
    st.stop()

SCALES = {"outlier-robust": "standardised", "raw ‖Δh‖/‖h‖": "raw"}
scale_name = st.radio("Scale", list(SCALES), horizontal=True, key="acc_scale",
                      help="outlier-robust: every hidden dimension divided by the dense stream's RMS of that dimension "
                           "at that layer (each dimension counts equally); raw: ‖Δh‖/‖h‖, dominated by a few "
                           "outlier dimensions")
scale = SCALES[scale_name]
y_title = "relative error (outlier-robust)" if scale == "standardised" else "relative error ‖Δh‖/‖h‖"
titles = {e.run.key: e.run.title for e in shown}
colors = {e.run.title: run_color(e.found.name, all_runs) for e in shown}
twins = [e.run.title for e in shown if not e.run.sequential]
captions = story(entries, scale)
by_key = {e.run.key: e for e in shown}


def outcome() -> None:
    """The final outcome in one row: perplexity and KL of every run, the dense model first."""
    dense = shown[0].profile
    cols = st.columns(len(shown) + 1)
    cols[0].markdown(f"<span style='color:{DENSE_COLOR}'>■</span> **dense**", unsafe_allow_html=True)
    cols[0].metric("dense · PPL", f"{dense.ppl_dense:.2f}")
    cols[0].caption("KL 0 (the reference)")
    for col, e in zip(cols[1:], shown):
        col.markdown(f"<span style='color:{colors[e.run.title]}'>■</span> **{e.run.title}**", unsafe_allow_html=True)
        col.metric(f"{e.run.title} · PPL", f"{e.profile.ppl:.2f}", help=f"run {e.found.title}")
        col.caption(f"KL(dense‖run) {e.profile.kl:.4f} nats per token")
    st.caption(f"Perplexity on the first {dense.windows} windows of {dense.seqlen} tokens of {dense.dataset}; KL "
               "averaged over every position of those windows.")


def own_chart():
    key = st.selectbox("Run", list(titles), format_func=titles.get, key="acc_own_run") if len(titles) > 1 \
        else next(iter(titles))
    e = by_key[key]
    return charts.own_vs_total(e.run.title, e.profile.own(scale), e.profile.total(scale), colors[e.run.title],
                               y_title, presenter)


def sequential_chart():
    return charts.depth_lines({e.run.title: e.profile.total(scale) for e in shown},
                              "Sequential vs dense-input calibration: total error per layer", y_title, colors, twins,
                              presenter)


def schedule_chart():
    pair = [by_key[k] for k in ("slimgpt", "uniform") if k in by_key]
    return charts.depth_lines({e.run.title: e.profile.total(scale) for e in pair},
                              "Log vs uniform schedule at the same budget: total error per layer", y_title, colors,
                              (), presenter)


def difference_chart():
    mode = st.radio("Difference", ["run − its dense-input twin", "total − own (inherited)"], horizontal=True,
                    key="acc_diff")
    if mode.startswith("run"):
        diffs = {f"{titles[k]} − twin": v for k, v in twin_differences(entries, scale).items()}
        diff_colors = {f"{titles[k]} − twin": colors[titles[k]] for k in twin_differences(entries, scale)}
        title = "Sequential minus dense-input: below zero, sequential calibration carries less error"
    else:
        diffs = {titles[k]: v for k, v in inherited(entries, scale).items()}
        diff_colors = colors
        title = "Inherited error per layer: total minus own"
    return charts.depth_lines(diffs, title, f"difference ({scale_name})", diff_colors,
                              twins if not mode.startswith("run") else (), presenter, zero_line=True)


def scale_chart():
    p = shown[0].profile
    return charts.dense_stream(p.dense_rms, p.outlier_share, presenter)


SLIDES = [("own", "Own vs inherited", own_chart), ("sequential", "Sequential vs dense inputs", sequential_chart),
          ("schedule", "Log vs uniform", schedule_chart), ("difference", "The difference", difference_chart),
          ("outcome", "The outcome", None), ("scale", "Why two scales", scale_chart)]

if presenter:
    st.markdown("<style>[data-testid='stMainBlockContainer'] p, [data-testid='stMainBlockContainer'] li "
                "{font-size: 1.45rem; line-height: 1.5} [data-testid='stMetricValue'] {font-size: 3rem}</style>",
                unsafe_allow_html=True)
    ss.setdefault("acc_slide", 0)
    n1, n2, n3 = st.columns([1.5, 6, 1.2])
    n1.button("◀ Previous", key="acc_prev", disabled=ss.acc_slide == 0,
              on_click=lambda: ss.__setitem__("acc_slide", ss.acc_slide - 1))
    n3.button("Next ▶", key="acc_next", disabled=ss.acc_slide == len(SLIDES) - 1,
              on_click=lambda: ss.__setitem__("acc_slide", ss.acc_slide + 1))
    key, heading, draw = SLIDES[ss.acc_slide]
    n2.markdown(f"## {ss.acc_slide + 1}/{len(SLIDES)} · {heading}")
    if draw is None:
        outcome()
    else:
        st.plotly_chart(draw(), key=f"acc_chart_{key}")
    if captions.get(key):
        st.markdown(captions[key])
else:
    outcome()
    grid = [SLIDES[0], SLIDES[1], SLIDES[2], SLIDES[3]]
    for row in (grid[:2], grid[2:]):
        for col, (key, heading, draw) in zip(st.columns(2), row):
            with col:
                st.plotly_chart(draw(), key=f"acc_chart_{key}")
                if captions.get(key):
                    st.caption(captions[key])
    with st.expander("Why two scales?"):
        st.plotly_chart(scale_chart(), key="acc_chart_scale")
        if captions.get("scale"):
            st.caption(captions["scale"])
