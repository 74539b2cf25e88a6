"""Error accumulation made visible: runs overlaid, dense-input twins, per-layer detail."""

import streamlit as st

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.services import accumulation
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.schedules.run_schedule import EDITOR_MAX_RATIO, run_schedule
from slimgpt_core.services.prune import prune_to_workspace
from ui import charts
from ui.colors import run_color
from ui.prune_form import copy_schedule_into_editor
from ui.state import (current_model, job, job_progress, live_fragment, require_model, require_runs, run_report, submit,
                      take_result)

st.title("Inspect")
all_runs = require_runs()
labels = {name: info.title for name, info in all_runs.items()}
if "inspect_select_next" in st.session_state:  # set by the twin run, applied before the widget exists
    st.session_state.inspect_runs = st.session_state.pop("inspect_select_next")
st.session_state.setdefault("inspect_runs", list(labels)[:3])
st.session_state.inspect_runs = [r for r in st.session_state.inspect_runs if r in labels]  # runs may be gone
chosen = st.multiselect("Runs to compare", list(labels), format_func=labels.get, key="inspect_runs")
if chosen:
    colors = {labels[r]: run_color(r, all_runs) for r in chosen}
    twins = [labels[r] for r in chosen if not all_runs[r].summary.get("sequential", True)]  # dense-input runs
    scale = st.radio("Accumulated error scale", ["outlier-robust (held-out)", "raw (calibration)"], horizontal=True,
                     key="inspect_scale", help="outlier-robust: every hidden dimension divided by the dense stream's "
                     "RMS of that dimension (each counts equally), from the runs' accumulation profiles on held-out "
                     "text; raw: ‖Δh‖/‖h‖ on the calibration tokens, measured while pruning, dominated by a "
                     "few "
                     "outlier dimensions of the residual stream")
    profiles = {r: accumulation.stored_profile(all_runs[r].evaluations, {}) for r in chosen}
    c1, c2 = st.columns(2)
    measured = {(p.dataset, p.seqlen, p.windows) for p in profiles.values() if p is not None}
    if scale.startswith("outlier") and all(profiles.values()) and len(measured) == 1:
        dataset, seqlen, windows = measured.pop()
        c1.plotly_chart(charts.depth_lines({labels[r]: profiles[r].total_std for r in chosen},
                                           "Accumulated error along depth · outlier-robust",
                                           f"relative error, standardised ({dataset}, {windows}×{seqlen})", colors,
                                           twins), key="inspect_acc")
    else:
        c1.plotly_chart(charts.accumulated_error({labels[r]: run_report(all_runs[r]).layers for r in chosen}, colors,
                                                 twins), key="inspect_acc")
        if scale.startswith("outlier"):
            lacking = [r for r in chosen if profiles[r] is None]
            c1.caption("Raw scale shown: " + (f"{len(lacking)} of these runs have no accumulation profile yet."
                                              if lacking else "their profiles were measured on different text."))
            loaded_now = current_model()
            base_ok = loaded_now is not None and all(accumulation.same_model(run_report(all_runs[r]).model,
                                                                             loaded_now.name) for r in lacking)
            profiling = job("inspect_profiles")
            if lacking and c1.button("Profile them on held-out text", key="inspect_profile",
                                     disabled=not base_ok or bool(profiling and profiling.running),
                                     help="the Accumulation page's held-out text and windows; needs their base "
                                          "model loaded"):
                held_out = st.session_state.get("acc_settings", {})  # the Accumulation page's, when visited
                config = accumulation.DemoConfig(heldout=held_out.get("acc_heldout", "wikitext2"),
                                    eval_seqlen=int(held_out.get("acc_eval_seqlen", 128)),
                                    windows=int(held_out.get("acc_windows", 32)), device=st.session_state.model_spec[1])
                submit("inspect_profiles", accumulation.profile_runs, loaded_now, [all_runs[r] for r in lacking],
                       config, job_label=f"{len(lacking)} profile(s)")
    c2.plotly_chart(charts.reconstruction_error({labels[r]: run_report(all_runs[r]).modules for r in chosen}, colors,
                                                twins), key="inspect_recon")


def profiles_status() -> None:
    pj = job("inspect_profiles")
    if pj is not None and pj.running:
        job_progress(pj, "Cancel profiles", "cancel_inspect_profiles")
    elif pj is not None and pj.state == "failed":
        st.error(pj.error)
    elif take_result(pj):
        st.rerun(scope="app")


live_fragment(profiles_status, "inspect_profiles")

# a dense-input twin shows what the sequential pipeline's error accumulation costs
st.subheader("Sequential vs dense inputs")
base_id = st.selectbox("Run", list(labels), format_func=labels.get, key="twin_base")
base = all_runs[base_id]
base_report = run_report(base)
loaded = require_model()
twin_job = job("twin")
if loaded is not None and base_report.model == loaded.name:
    mode = "dense inputs" if base_report.settings.get("sequential", True) else "sequential inputs"
    if st.button(f"Run its twin with {mode}", disabled=bool(twin_job and twin_job.running)):
        settings = PruneSettings.from_record(base_report.settings)
        settings.sequential = not settings.sequential
        s = base_report.settings
        submit("twin", prune_to_workspace, loaded, settings, s["calib"], s["nsamples"], s["seqlen"], s["seed"],
               label=f"{base.label or base.name} · twin ({mode})", device=st.session_state.model_spec[1],
               source_run=base.name)
elif loaded is not None:
    st.caption(f"Load {base_report.model} on the Model page to run this run's twin.")


def twin_status() -> None:
    tj = job("twin")
    if tj is None:
        return
    if tj.running:
        job_progress(tj, "Cancel twin", "cancel_twin", len(base_report.layers))
    elif tj.state == "failed":
        st.error(tj.error)  # drawn on every run, not only once: a rerun would wipe it
    elif take_result(tj) and tj.state == "done":
        st.session_state.inspect_select_next = list(dict.fromkeys([tj.result.summary.get("source_run") or base_id,
                                                                   tj.result.name]))
        st.session_state.current_run = tj.result.name
        st.rerun(scope="app")


live_fragment(twin_status, "twin")

# per-layer detail
st.subheader("Layer detail")
d1, d2 = st.columns([2, 3])
detail_id = d1.selectbox("Run ", list(labels), format_func=labels.get, key="detail_run")
report = run_report(all_runs[detail_id])
layer = d2.slider("Layer", 0, len(report.layers) - 1, 0, key="detail_layer")
heads = [h for h in report.heads if h.layer == layer]
ffn = [f for f in report.ffn if f.layer == layer]
c1, c2 = st.columns(2)
if heads:
    c1.plotly_chart(charts.head_scores_bar(heads[0]), key="detail_heads")
if ffn:
    c2.plotly_chart(charts.ffn_histogram(ffn[0]), key="detail_ffn")
c3, c4 = st.columns(2)
c3.plotly_chart(charts.predicted_vs_measured(report.modules), key="detail_pred")
rows = [{"module": m.module, "removed": f"{m.units_removed}/{m.units_total}", "requested": round(m.ratio_requested, 3),
         "measured error": f"{m.rel_error:.3e}", "predicted": f"{m.predicted_rel_error:.3e}", "damping": m.damping}
        for m in report.modules if m.layer == layer]
c4.dataframe(rows, hide_index=True)

# the allocation as a schedule (LLM Surgeon's global threshold chose it): into the Prune page's editor
st.subheader("Allocation as a schedule")


def copy_schedule(head_ratios: list[float], ffn_ratios: list[float], title: str) -> None:
    """A button callback: the schedule becomes the Prune page's hand-edited one (its previous hand edits are kept)."""
    copy_schedule_into_editor(head_ratios, ffn_ratios, st.session_state.model_spec[0])
    st.session_state.schedule_copied = title


try:
    allocation = run_schedule(report)
except SlimGPTError as exc:
    st.caption(str(exc))
else:
    a1, a2 = st.columns([3, 2])
    a1.plotly_chart(charts.schedule_curve(allocation.head_ratios, allocation.ffn_ratios), key="allocation_chart")
    a2.dataframe([{"layer": i, "heads kept": h, "FFN kept": f, "heads removed": round(hr, 4),
                   "FFN removed": round(fr, 4)}
                  for i, (h, f, hr, fr) in enumerate(zip(allocation.heads_kept, allocation.ffn_kept,
                                                          allocation.head_ratios, allocation.ffn_ratios))],
                 hide_index=True, key="allocation_table")
    if allocation.capped:
        st.warning(f"Layers {', '.join(map(str, allocation.capped))} lost more than {EDITOR_MAX_RATIO:.0%}: the "
                   f"editor takes {EDITOR_MAX_RATIO:.0%} there (use --keep-heads/--keep-ffn for the exact shape).")
    title = all_runs[detail_id].title
    same_model = loaded is not None and report.model == loaded.name
    a2.button("Copy into the schedule editor", key="copy_schedule", disabled=not same_model,
              on_click=copy_schedule, args=(allocation.head_ratios, allocation.ffn_ratios, title),
              help="the Prune page's per-layer sliders take these ratios (still editable)")
    if not same_model:
        a2.caption(f"Load {report.model} on the Model page to copy this schedule into the editor.")
    elif st.session_state.get("schedule_copied") == title:
        a2.success(f"The Prune page's sliders hold the allocation of **{title}**.")

# predicted (dense inputs, from the error curves) vs measured (the run), on the sensitivity map
st.subheader("Predicted vs measured")
rs = report.settings
wanted = (rs.get("calib"), rs.get("nsamples"), rs.get("seqlen"), rs.get("seed"), float(rs.get("damp", 0.01)))
run_curves = next((c for key, c in st.session_state.get("error_curves", {}).items()
                   if tuple(key[1:]) == wanted and len(c.layers) == len(report.layers)), None)
if run_curves is None:
    st.caption("Compute the error curves on the Prune page with this run's calibration to see its predicted errors "
               "and its path on the sensitivity map.")
else:
    from slimgpt_core.schedules.curves import sensitivity_map

    attn = sorted((m for m in report.modules if m.module == "attn"), key=lambda m: m.layer)
    mlp = sorted((m for m in report.modules if m.module == "mlp"), key=lambda m: m.layer)
    lcs = run_curves.layers
    st.plotly_chart(charts.whatif_errors([lc.head_error(m.units_removed) for lc, m in zip(lcs, attn)],
                                         [lc.ffn_error(m.units_removed) for lc, m in zip(lcs, mlp)],
                                         [m.rel_error for m in attn], [m.rel_error for m in mlp]),
                    key="inspect_whatif")
    smap = sensitivity_map(run_curves)
    st.plotly_chart(charts.sensitivity_map(smap.ratios, smap.heads, smap.ffn,
                                           [m.units_removed / m.units_total for m in attn],
                                           [m.units_removed / m.units_total for m in mlp], all_runs[detail_id].title,
                                           [m.rel_error for m in attn], [m.rel_error for m in mlp]),
                    key="inspect_sensitivity")
