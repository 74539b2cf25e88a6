"""Runs side by side: schedules, errors, KV groups kept, size, and every stored evaluation with its provenance
and its noise. Reads the workspace only (no weights)."""
import pandas as pd
import streamlit as st

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.workspace.run_comparison import NOISE_Z, compare_evaluations, kv_group_grid, provenance_rows, sides_for
from ui import charts, comparison_charts
from ui.colors import DENSE_COLOR, run_color
from ui.state import current_run, require_runs

st.title("Side by side")
all_runs = require_runs()
labels = {name: info.title for name, info in all_runs.items()}
made = current_run()  # what the user just made and the run it came from
default = [made.name] + [s for s in [made.summary.get("source_run")] if s in labels] if made else []
default = list(dict.fromkeys(default + list(labels)))[:max(2, len(default))]  # two at least: the newest
st.session_state.setdefault("sbs_runs", default)
st.session_state.sbs_runs = [r for r in st.session_state.sbs_runs if r in labels]  # runs may be gone
chosen = st.multiselect("Runs", list(labels), format_func=labels.get, key="sbs_runs")
include_dense = st.checkbox("Include the dense model", value=True, key="sbs_dense")
if not chosen:
    st.info("Pick one or more runs to put side by side.")
    st.stop()
try:
    sides = sides_for([all_runs[name] for name in chosen], include_dense)
except SlimGPTError as exc:
    st.error(str(exc))
    st.stop()
runs_only = [s for s in sides if not s.dense]
colors = {s.label: DENSE_COLOR if s.dense else run_color(s.key, all_runs) for s in sides}  # as on every page
twins = [s.label for s in runs_only if not (s.report.settings or {}).get("sequential", True)]  # dense-input runs

st.subheader("What they are")
st.dataframe(pd.DataFrame([{
    "model": s.label, "base": s.model, "method": s.method, "schedule": s.schedule,
    "calibration": "—" if s.dense else f"{s.calibration.get('calib')} · {s.calibration.get('nsamples')} × "
                                       f"{s.calibration.get('seqlen')} tokens · seed {s.calibration.get('seed')}",
    "requested": "—" if s.dense else f"{s.requested_ratio:.1%}",
    "removed (all params)": "—" if s.dense else f"{s.achieved_ratio:.1%}",
    "parameters (M)": round(s.parameters / 1e6, 3) if s.parameters else None,
    "size on disk (MB)": round(s.size_bytes / 2**20, 2) if s.size_bytes else None,
} for s in sides]), hide_index=True)

st.plotly_chart(comparison_charts.schedules(sides, colors), key="sbs_schedules")
c1, c2 = st.columns(2)
c1.plotly_chart(charts.reconstruction_error({s.label: s.report.modules for s in runs_only}, colors, twins),
                key="sbs_recon")
c2.plotly_chart(charts.accumulated_error({s.label: s.report.layers for s in runs_only}, colors, twins),
                key="sbs_acc")

st.subheader("KV groups kept")
grid = kv_group_grid(sides)
if grid.labels:
    st.plotly_chart(comparison_charts.kv_group_diff(grid), key="sbs_groups")
    st.caption(f"{grid.n_differing} of {sum(grid.units)} groups are kept by some of these runs and not by others."
               if len(grid.labels) > 1 else "One run: green kept, red removed.")
for label, why in grid.left_out.items():
    st.caption(f"{label}: not in the grid ({why}).")

st.subheader("Evaluations")
groups = compare_evaluations(sides)
if not groups:
    st.info("Nothing measured of these models yet: measure them on the **Evaluate** page; every measurement is "
            "stored with its run.")
    st.stop()
st.caption(f"One row per measurement made the same way (text, windows and tokenizer; task, documents and "
           f"source). Accuracies carry ± their standard error; a difference from the row's first model under "
           f"{NOISE_Z:g}·sqrt(se₁² + se₂²) is within noise and cannot tell the models apart. † standard error "
           f"not stored with the measurement: computed from its accuracy and document count, "
           f"sqrt(acc·(1−acc)/(n−1)), the closed form lm-eval reports. Perplexities carry no standard error.")


def shown(value, metric: str, against=None) -> str:
    """The value (± its standard error), and beside it how it stands against the row's first model."""
    if metric == "ppl":
        text = f"{value.value:.3f}"
    elif value.stderr is None:
        text = f"{value.value:.3f} (no stderr)"
    else:
        text = f"{value.value:.3f} ± {value.stderr:.3f}{' †' if value.stderr_source == 'computed' else ''}"
    if against is not None:
        judged = {True: "within noise", False: "beyond noise", None: "same windows" if metric == "ppl" else "?"}
        text += f"  (Δ {against.difference:+.3f}, {judged[against.within_noise]})"
    return text


rows = []
for g in groups:
    row = {"measured": f"{g.name} ({g.metric})", "setting": g.setting}
    row.update({s.label: shown(g.values[s.label], g.metric, g.verdicts.get(s.label)) if s.label in g.values
                else "" for s in sides})
    row["vs the row's first model"] = "; ".join(f"{label}: {v.difference:+.3f}, {v.text}"
                                                for label, v in g.verdicts.items()) or "one model only"
    row["note"] = g.flag or ("" if len(g.values) == len(sides) else "measured on some models only")
    rows.append(row)
st.dataframe(pd.DataFrame(rows), hide_index=True)
if any(g.metric == "acc" for g in groups):
    st.plotly_chart(comparison_charts.accuracies(groups, colors), key="sbs_acc_bars")
with st.expander("Every measurement with its provenance"):
    st.dataframe(pd.DataFrame(provenance_rows(sides)), hide_index=True)
