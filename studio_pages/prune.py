"""Calibration, method, schedule editor with instant preview, and the pruning run with live charts."""
import streamlit as st

from slimgpt_core.schedules.autoschedule import AutoSettings, auto_job
from slimgpt_core.schedules.curves import curves_job, predict, sensitivity_map
from slimgpt_core.errors import SlimGPTError
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.schedules.schedule import layer_ratios
from slimgpt_core.studio import head_importance, preview_schedule, prune_to_workspace
from ui import charts
from ui.state import job, job_progress, live_fragment, require_model, run_report, submit, take_result

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
EDITOR_DEFAULTS = {"target_ratio": 0.2, "ffn_target": 0.2, "shape": 4.0, "preset": "log", "separate": False,
                   "balance": 1.0}


def balanced_targets() -> tuple[float, float]:
    """(head mean, FFN mean): the heads take `balance` × the target, the FFN what keeps the parameter cut."""
    e = ss.editor
    if e["separate"]:
        return e["target_ratio"], e["ffn_target"]
    attn = sum(p.numel() for layer in loaded.model.model.layers for p in layer.self_attn.parameters())
    mlp = sum(p.numel() for layer in loaded.model.model.layers for p in layer.mlp.parameters())
    head = min(0.9, e["balance"] * e["target_ratio"])
    return head, min(0.9, max(0.0, (e["target_ratio"] * (attn + mlp) - head * attn) / mlp))


def apply_preset() -> None:
    e = ss.editor
    if e["preset"] == "auto" and ss.get("auto_shown") and "schedule" in ss:  # a search's schedule stays in the sliders until a setting moves
        return
    try:
        head_t, ffn_t = balanced_targets()
        preset = "log" if e["preset"] == "auto" else e["preset"]  # auto starts from log until a search ends
        heads = layer_ratios(n_layers, head_t, preset, e["shape"])
        ffn = layer_ratios(n_layers, ffn_t, preset, e["shape"])
    except SlimGPTError as exc:
        ss.preset_error = str(exc)
        return
    ss.preset_error = None
    ss.schedule = {"hr": [round(r, 4) for r in heads], "fr": [round(r, 4) for r in ffn]}


def edit_setting(key: str) -> None:
    ss.editor[key] = ss[key]
    ss.pop("auto_shown", None)  # a new target or shape needs a new search: auto shows log until then
    apply_preset()


def edit_ratio(kind: str, i: int) -> None:
    if i < len(ss.schedule[kind]):  # not a slider of a previous model's deeper schedule
        ss.schedule[kind][i] = ss[f"{kind}_{i}"]


ss.setdefault("editor", dict(EDITOR_DEFAULTS))
for key, value in EDITOR_DEFAULTS.items():
    ss.editor.setdefault(key, value)
for key, value in ss.editor.items():
    ss[key] = value
ss.setdefault("error_curves", {})
if len(ss.get("schedule", {}).get("hr", ())) != n_layers:
    ss.pop("schedule", None)
    apply_preset()
if "auto_pending" in ss:  # a finished (or stopped) auto search: its schedule goes into the sliders, still editable
    found = ss.pop("auto_pending")
    if len(found.head_ratios) == n_layers:
        ss.schedule = {"hr": [round(r, 4) for r in found.head_ratios], "fr": [round(r, 4) for r in found.ffn_ratios]}
        ss.auto_shown = True

st.subheader("Schedule")
p1, p2, p3, p4, p5 = st.columns([1.2, 1.5, 1, 1, 1.5])
p1.selectbox("Preset", ["log", "linear", "uniform", "auto"], key="preset", on_change=edit_setting, args=("preset",),
             help="log: Incremental Pruning Ratio (SlimGPT); auto: searched for the parameter budget (KL on "
                  "calibration tokens)")
p2.slider("Target mean ratio", 0.0, 0.9, key="target_ratio", step=0.01, on_change=edit_setting, args=("target_ratio",))
p3.number_input("Shape (last/first)", 1.0, 20.0, key="shape", step=0.5, on_change=edit_setting, args=("shape",))
p4.checkbox("Separate FFN target", key="separate", on_change=edit_setting, args=("separate",))
if ss.editor["separate"]:
    p5.slider("FFN mean ratio", 0.0, 0.9, key="ffn_target", step=0.01, on_change=edit_setting, args=("ffn_target",))
else:
    p5.slider("Heads share (× target)", 0.0, 2.0, key="balance", step=0.05, on_change=edit_setting, args=("balance",),
              help="heads take this multiple of the target mean ratio; the FFN takes what keeps the parameter cut")
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

# --- what-if from the error curves (no forward pass) and the auto search ----------------------------
curves_id = (ss.model_spec, calib, int(nsamples), int(seqlen), int(seed), float(damp))  # Inspect looks them up
curves_key = repr(curves_id)  # the job's label: which curves a finished job holds
st.subheader("What-if (predicted on dense inputs)")
model_curves = ss.error_curves.get(curves_id)
if model_curves is None and job("curves") and job("curves").state == "done" and job("curves").label == curves_key:
    model_curves = ss.error_curves[curves_id] = job("curves").result  # another tab's, or before a reload
if ss.editor["preset"] == "auto":
    a1, a2, a3, a4 = st.columns([1, 1.4, 1, 1.2])
    a1.number_input("Per-layer ceiling", 0.1, 0.95, 0.9, step=0.05, key="auto_ceiling",
                    help="at most this fraction of any layer's KV groups or FFN channels is removed")
    a2.number_input("Target parameters (0: from the mean ratio)", 0, int(preview.params_before), 0, step=100_000,
                    key="auto_target_params")
    a3.number_input("Generations", 1, 5000, 200, key="auto_generations")
    auto_running = bool(job("auto") and job("auto").running)
    if a4.button("Search auto schedule", disabled=auto_running, type="primary"):
        target_params = int(ss.auto_target_params) or None
        e = ss.editor
        starts = {kind: (layer_ratios(n_layers, e["target_ratio"], kind, e["shape"]),) * 2
                  for kind in ("log", "linear", "uniform")} if target_params is None else None
        auto_settings = AutoSettings(target_params=target_params, ratio=e["target_ratio"], ceiling=ss.auto_ceiling,
                                     generations=int(ss.auto_generations), shape=e["shape"], seed=int(seed),
                                     damp=float(damp), device=ss.get("device", "auto"))
        submit("auto", auto_job, loaded, calib, int(nsamples), int(seqlen), int(seed), auto_settings, starts,
               job_label=f"{loaded.name} {e['target_ratio']:.0%}")
if model_curves is not None:
    pred = predict(model_curves, head_ratios, ffn_ratios)
    st.plotly_chart(charts.whatif_errors(pred.attn, pred.mlp), key="whatif_chart")
    smap = sensitivity_map(model_curves)
    st.plotly_chart(charts.sensitivity_map(
        smap.ratios, smap.heads, smap.ffn, [k / lc.n_kv for k, lc in zip(pred.kv_removed, model_curves.layers)],
        [c / lc.n_ffn for c, lc in zip(pred.ffn_removed, model_curves.layers)]), key="sensitivity_chart")
else:
    st.caption("Computes every layer's OBS error curves once from the dense statistics (cached); then every "
               "slider move redraws the predicted errors without a forward pass.")
    if st.button("Compute error curves", disabled=bool(job("curves") and job("curves").running)):
        submit("curves", curves_job, loaded, calib, int(nsamples), int(seqlen), int(seed), float(damp),
               ss.get("device", "auto"), job_label=curves_key)


def whatif_jobs() -> None:
    """Polls the curves and auto jobs; never blocks."""
    cj = job("curves")
    if cj is not None and cj.running:
        progress = [e for e in cj.events if e.kind == "progress"]
        done = progress[-1].layer if progress else 0
        st.progress(done / n_layers, text=f"error curves: layer {done}/{n_layers}")
    elif take_result(cj):
        if cj.state == "done" and cj.label == curves_key:
            ss.error_curves[curves_id] = cj.result
        elif cj.error:
            st.error(cj.error)
        st.rerun(scope="app")
    aj = job("auto")
    if aj is None:
        return
    events = [e for e in aj.events if e.kind == "search"]
    history = [(e.generation, e.best_kl) for e in events if e.phase in ("search", "done")]
    if aj.running:
        last = events[-1] if events else None
        text = (f"auto: {last.phase} · generation {last.generation} · KL {last.best_kl:.4f} (start {last.start_kl:.4f})"
                f" · {aj.elapsed:.0f} s" if last and history else f"auto: building the database · {aj.elapsed:.0f} s")
        st.progress(min(1.0, (last.generation if last else 0) / max(1, int(ss.get("auto_generations", 200)))),
                    text=text)
        if st.button("Stop search (keep the best so far)", key="stop_auto"):
            aj.cancel()
        if aj.queued:
            st.caption("queued: waits for the running job to finish")
    elif aj.state == "failed":
        st.error(aj.error)
    if history:
        st.plotly_chart(charts.search_progress(history), key="auto_search_chart")
    if aj.state == "done" and take_result(aj):
        ss.auto_pending = aj.result
        st.rerun(scope="app")
    elif aj.state == "done":
        r = aj.result
        st.success(f"auto: KL {r.kl:.4f} (started from {r.start}, KL {r.start_kl:.4f}) after {r.generations} "
                   f"generations; {r.params_after / 1e6:.3f} M parameters (target {r.target_params / 1e6:.3f} M). "
                   "The sliders hold its ratios: edit them freely.")


live_fragment(whatif_jobs, "curves", "auto")

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


live_fragment(live_view, "stats", "prune")
