"""Calibration, method, schedule editor with instant preview, and the pruning run with live charts."""
import streamlit as st

from slimgpt_core.errors import SlimGPTError
from slimgpt_core.pipeline import PruneSettings
from slimgpt_core.schedule import layer_ratios
from slimgpt_core.studio import head_importance, preview_schedule, prune_to_workspace
from ui import charts
from ui.state import job, job_progress, require_model, run_report, submit, take_result

st.title("Prune")
loaded = require_model()
if loaded is None:
    st.stop()
n_layers = len(loaded.model.model.layers)
ss = st.session_state

# --- calibration and method -------------------------------------------------------------------
with st.expander("Calibration data and method", expanded=False):
    c1, c2, c3, c4 = st.columns(4)
    calib = c1.selectbox("Calibration text", ["c4", "wikitext2", "tinystories", "file…"], key="calib_source")
    if calib == "file…":
        calib = st.text_input("Path to a .txt or .jsonl file", key="calib_path").strip() or "c4"
    context = getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048
    nsamples = c2.number_input("Samples", 1, 1024, 32, key="nsamples")
    seqlen = c3.number_input("Sequence length", 16, int(context), min(256, int(context)), step=16, key="seqlen")
    seed = c4.number_input("Seed", 0, 10**6, 0, key="seed")
    m1, m2, m3, m4, m5 = st.columns(5)
    damp = m1.number_input("Damping λ", 0.0, 1.0, 0.01, step=0.005, format="%.3f", key="damp")
    head_error = m2.selectbox("Head error", ["exact", "approx"], key="head_error",
                              help="exact group OBS error, or the authors' cheaper diagonal approximation")
    floor = m3.number_input("FFN group floor", 1, 4096, 64, key="ffn_floor")
    ceiling = m4.number_input("FFN group ceiling", 1, 8192, 1024, key="ffn_ceiling")
    dense_inputs = m5.checkbox("Dense inputs", key="dense_inputs",
                               help="calibrate every layer on the dense model's inputs (no error accumulation)")


# --- schedule editor ----------------------------------------------------------------------------
# Streamlit sends a widget's value to the browser only in a run that sets it through session state. A rerun that
# starts while the server still holds that run's unsent messages drops them, and the browser then mounts the widget
# at its default (0.0 for a slider) and sends that back at the next interaction: the job pruned nothing while the page
# had shown the preset. So the editor's state is plain session state (`ss.editor`, `ss.schedule`), changed only by
# the widgets' callbacks, and every widget is handed its value on every run: each of its messages carries it.
EDITOR_DEFAULTS = {"target_ratio": 0.2, "ffn_target": 0.2, "shape": 4.0, "preset": "log", "separate": False}


def apply_preset() -> None:
    e = ss.editor
    try:
        heads = layer_ratios(n_layers, e["target_ratio"], e["preset"], e["shape"])
        ffn = layer_ratios(n_layers, e["ffn_target"] if e["separate"] else e["target_ratio"], e["preset"], e["shape"])
    except SlimGPTError as exc:
        ss.preset_error = str(exc)
        return
    ss.preset_error = None
    ss.schedule = {"hr": [round(r, 4) for r in heads], "fr": [round(r, 4) for r in ffn]}


def edit_setting(key: str) -> None:
    ss.editor[key] = ss[key]
    apply_preset()


def edit_ratio(kind: str, i: int) -> None:
    if i < len(ss.schedule[kind]):  # not a slider of a previous model's deeper schedule
        ss.schedule[kind][i] = ss[f"{kind}_{i}"]


ss.setdefault("editor", dict(EDITOR_DEFAULTS))
for key, value in ss.editor.items():
    ss[key] = value
if len(ss.get("schedule", {}).get("hr", ())) != n_layers:
    apply_preset()

st.subheader("Schedule")
p1, p2, p3, p4, p5 = st.columns([1.2, 1.5, 1, 1, 1.5])
p1.selectbox("Preset", ["log", "linear", "uniform"], key="preset", on_change=edit_setting, args=("preset",),
             help="log: Incremental Pruning Ratio (SlimGPT)")
p2.slider("Target mean ratio", 0.0, 0.9, key="target_ratio", step=0.01, on_change=edit_setting, args=("target_ratio",))
p3.number_input("Shape (last/first)", 1.0, 20.0, key="shape", step=0.5, on_change=edit_setting, args=("shape",))
p4.checkbox("Separate FFN target", key="separate", on_change=edit_setting, args=("separate",))
if ss.editor["separate"]:
    p5.slider("FFN mean ratio", 0.0, 0.9, key="ffn_target", step=0.01, on_change=edit_setting, args=("ffn_target",))
if ss.get("preset_error"):
    st.error(ss.preset_error)

with st.expander("Per-layer ratios (drag to edit)", expanded=n_layers <= 8):
    h_col, f_col = st.columns(2)
    h_col.caption("Attention heads")
    f_col.caption("FFN channels")
    for i in range(n_layers):
        for kind, col, part in (("hr", h_col, "heads"), ("fr", f_col, "FFN")):
            ss[f"{kind}_{i}"] = ss.schedule[kind][i]
            col.slider(f"layer {i} {part}", 0.0, 0.95, key=f"{kind}_{i}", step=0.01, on_change=edit_ratio,
                       args=(kind, i))

head_ratios = list(ss.schedule["hr"])
ffn_ratios = list(ss.schedule["fr"])
settings = PruneSettings(ratio=ss.editor["target_ratio"], schedule=ss.editor["preset"], shape=ss.editor["shape"],
                         head_ratios=head_ratios, ffn_ratios=ffn_ratios, damp=damp, head_error=head_error,
                         ffn_group_floor=int(floor), ffn_group_ceiling=int(ceiling), sequential=not dense_inputs,
                         device=ss.get("device", "auto"))
try:
    preview = preview_schedule(loaded.model, settings)
except SlimGPTError as exc:
    st.error(str(exc))
    st.stop()

info_cols = st.columns(4)
info_cols[0].metric("Parameters after", f"{preview.params_after / 1e6:.2f} M",
                    f"-{(preview.params_before - preview.params_after) / 1e6:.2f} M")
info_cols[1].metric("Achieved (decoder layers)", f"{preview.achieved_layer_ratio:.1%}",
                    help="rounded to whole heads / KV groups")
info_cols[2].metric("Achieved (whole model)", f"{preview.achieved_ratio:.1%}")
info_cols[3].metric("Requested mean", f"{sum(head_ratios + ffn_ratios) / (2 * n_layers):.1%}")
q0 = [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim for layer in loaded.model.model.layers]
f0 = [layer.mlp.down_proj.in_features for layer in loaded.model.model.layers]
st.plotly_chart(charts.schedule_curve(head_ratios, ffn_ratios, [k / q for k, q in zip(preview.heads_kept, q0)],
                                      [k / f for k, f in zip(preview.ffn_kept, f0)]), key="schedule_chart")

# --- head-importance preview from cached dense statistics -------------------------------------
stats_key = repr((ss.model_spec, calib, int(nsamples), int(seqlen), int(seed), float(damp)))
stats = ss.head_stats.get(stats_key)
if stats is None and job("stats") and job("stats").state == "done" and job("stats").label == stats_key:
    stats = ss.head_stats[stats_key] = job("stats").result  # computed by another tab or before a reload
st.subheader("Head importance preview")
if stats is not None:
    removed = stats.preview_removed(head_ratios)
    st.plotly_chart(charts.head_heatmap(stats.head_scores, removed, max(stats.heads_per_unit),
                                        "Dense head importance; ✕ = would be removed at these ratios"),
                    key="preview_heatmap")
else:
    st.caption("Scores every head group of the dense model once (cached), then marks what each layer would lose as "
               "you drag.")
    if st.button("Compute head importance", disabled=bool(job("stats") and job("stats").running)):
        submit("stats", head_importance, loaded, calib, int(nsamples), int(seqlen), int(seed), float(damp),
               ss.model_spec[1], job_label=stats_key)

# --- the run --------------------------------------------------------------------------------------
st.subheader("Run")
prune_job = job("prune")
if st.button("Start pruning", type="primary", disabled=bool(prune_job and prune_job.running)):
    submit("prune", prune_to_workspace, loaded, settings, calib, int(nsamples), int(seqlen), int(seed),
           device=ss.model_spec[1], job_label=f"{loaded.name} {preview.achieved_layer_ratio:.0%}")


def live_view() -> None:
    """Polled while a job runs; never blocks. The job threads never touch Streamlit. Jobs belong to the server,
    so a reloaded page or a second tab finds them here with their events."""
    sj = job("stats")
    if sj is not None and sj.running:
        job_progress(sj, "Cancel statistics", "cancel_stats", n_layers)
    elif take_result(sj):
        if sj.state == "done" and sj.label == stats_key:
            ss.head_stats[stats_key] = sj.result
            st.rerun()
        elif sj.error:
            st.error(sj.error)

    pj = job("prune")
    if pj is None:
        return
    events = list(pj.events)
    layers_done = [e for e in events if e.kind == "layer"]
    if pj.running:
        job_progress(pj, "Cancel", "cancel_prune", n_layers)
        if not pj.queued:
            st.caption(f"layer {len(layers_done)}/{n_layers} of **{pj.label}**")
    elif pj.state == "done":
        info = pj.result
        r = run_report(info)
        st.success(f"Done in {r.total_seconds:.1f} s: {r.params_before / 1e6:.2f} M → {r.params_after / 1e6:.2f} M "
                   f"parameters, achieved {r.achieved_layer_ratio:.1%} of layer parameters "
                   f"({r.achieved_ratio:.1%} of all). Saved as run **{info.title}** in the workspace; evaluate or "
                   "export it on the next pages.")
    elif pj.state == "cancelled":
        st.warning("Pruning was cancelled; nothing was written and the loaded model is unchanged.")
    elif pj.state == "failed":
        st.error(pj.error)
    modules = [e for e in events if e.kind == "module"]
    heads = [e for e in events if e.kind == "heads"]
    if modules:
        c1, c2 = st.columns(2)
        c1.plotly_chart(charts.reconstruction_error({"this run": modules}), key="live_recon")
        c2.plotly_chart(charts.accumulated_error({"this run": layers_done}), key="live_acc")
    if heads:
        st.plotly_chart(charts.head_heatmap([h.scores for h in heads], [h.removed for h in heads],
                                            heads[0].heads_per_unit), key="live_heatmap")
    if take_result(pj):  # once the job has ended: select its run and refresh the whole page (sidebar, buttons)
        if pj.state == "done":
            ss.current_run = pj.result.name
        st.rerun()


busy = any(j is not None and j.running for j in (job("stats"), job("prune")))
st.fragment(run_every=1.0 if busy else None)(live_view)()
