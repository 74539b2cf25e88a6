"""Calibration, method, schedule editor with instant preview, and the pruning run with live charts."""
import pandas as pd
import streamlit as st

from slimgpt_core.schedules.curves import curves_job
from slimgpt_core.schedules.editor_data import editor_payload
from slimgpt_core.schedules.global_allocation import BudgetSpec
from slimgpt_core.schedules.refine import AutoConfig, auto_job
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import layer_shape
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.services.prune import head_importance, preview_schedule, prune_to_workspace
from ui import charts
from ui.prune_form import (ALIGN_CHOICES, CALIBRATION_SOURCES, PRESETS, PRUNE_FORM_FIELDS, SCHEDULE_FIELDS, PruneForm,
                           align_setting, apply_preset, calibration_text, describe_frozen, frozen, load_form,
                           preset_ratios, problems, restore_custom, save_form, set_schedule)
from ui.schedule_editor import MAX_RATIO, apply_edit, dropped_edit, schedule_editor
from ui.state import bound_widget, job, job_progress, live_fragment, require_model, run_report, submit, take_result

st.title("Prune")
loaded = require_model()
if loaded is None:
    st.stop()
n_layers = len(loaded.model.model.layers)
ss = st.session_state
ss.setdefault("error_curves", {})

# --- calibration and method -------------------------------------------------------------------
# One settings object (ui.prune_form) defines the run; it lives in the workspace, so page switches, reloads, other tabs
# and restarts show the same values. Every widget shows the form's value and only its callback changes the form
# (ui.state.bound_widget: how the value reaches the browser without an older run's value overwriting a newer edit).
attn_params = sum(p.numel() for layer in loaded.model.model.layers for p in layer.self_attn.parameters())
mlp_params = sum(p.numel() for layer in loaded.model.model.layers for p in layer.mlp.parameters())
context = int(getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048)
form = load_form()
if form.model != loaded.name or len(form.hr) != n_layers or len(form.fr) != n_layers:
    form.model, form.origin, form.custom = loaded.name, "preset", None  # another model: its own preset schedule
    apply_preset(form, n_layers, attn_params, mlp_params)
    save_form(form)
if "auto_pending" in ss:  # auto's best schedule so far (or its last): into the editor, still editable
    found = ss.pop("auto_pending")
    if len(found.head_ratios) == n_layers:
        set_schedule(form, [round(r, 4) for r in found.head_ratios], [round(r, 4) for r in found.ffn_ratios], "auto")
        save_form(form)

WIDGET_FIELDS = {"calib_source": "calib"}  # widget key -> form field, where they differ


def edit(key: str) -> None:
    """A widget's callback: the change goes into the stored form (read afresh: another tab may have written)."""
    f = load_form()
    name = WIDGET_FIELDS.get(key, key)
    setattr(f, name, ss[key])
    if name in SCHEDULE_FIELDS:  # a new target or shape needs a new preset (and a new search for auto)
        apply_preset(f, n_layers, attn_params, mlp_params)
    save_form(f)


def edit_schedule(edit: dict | None) -> int:
    """Write an edit ({"hr": [[layer, ratio], …], "fr": […]}) into the stored schedule as a hand edit; returns how
    many ratios it wrote (layers the schedule has, ratios in range)."""
    f = load_form()
    schedule = {"hr": list(f.hr), "fr": list(f.fr)}
    written = apply_edit(schedule, edit)
    if written:
        set_schedule(f, schedule["hr"], schedule["fr"], "hand")
        save_form(f)
    return written


def editor_dropped() -> None:
    """A drag or key edit ended in the editor: its ratios become the schedule's."""
    edit_schedule(dropped_edit())


def preset_ghost() -> tuple[list[float], list[float]]:
    """The preset's own ratios for the editor's ghost and snap-back; the schedule itself when the preset cannot be
    built."""
    try:
        return preset_ratios(form, n_layers, attn_params, mlp_params)
    except SlimGPTError:
        return list(form.hr), list(form.fr)


def restore_hand_edits() -> None:
    f = load_form()
    restore_custom(f)
    save_form(f)


def widget(make, key: str, *args, **kwargs):
    return bound_widget(make, key, getattr(form, WIDGET_FIELDS.get(key, key)), edit, *args, **kwargs)


# Open, so what a run will use is in view. The label stays fixed: a label that changes makes a new expander, which
# closes under the user's edit.
with st.expander("Calibration data and method", expanded=True):
    c1, c2, c3, c4 = st.columns(4)
    widget(c1.selectbox, "calib_source", "Calibration text", list(CALIBRATION_SOURCES))
    if form.calib == "file…":
        widget(st.text_input, "calib_path", "Path to a .txt or .jsonl file")
    widget(c2.number_input, "nsamples", "Samples", 0, 1_000_000)
    widget(c3.number_input, "seqlen", "Sequence length", 0, 1_000_000, step=16,
           help=f"at most the model's context, {context} tokens")
    widget(c4.number_input, "seed", "Seed", 0, 10**6)
    m1, m2, m3, m4, m5, m6 = st.columns(6)
    widget(m1.number_input, "damp", "Damping λ", 0.0, 1.0, step=0.005, format="%.3f")
    widget(m2.selectbox, "head_error", "Head error", ["exact", "approx"],
           help="exact group OBS error, or the authors' cheaper diagonal approximation")
    widget(m3.number_input, "ffn_floor", "FFN group floor", 1, 4096)
    widget(m4.number_input, "ffn_ceiling", "FFN group ceiling", 1, 8192)
    widget(m6.selectbox, "align", "Align FFN widths", ALIGN_CHOICES,
           help="every pruned layer keeps a multiple of this many FFN channels: 32 lets llama.cpp quantize every "
                "row to Q8_0, 256 to its K-quants; 1: no rounding; auto: 32 where the dense width is a multiple "
                "of 32 and at least 512 wide")
    widget(m5.checkbox, "dense_inputs", "Dense inputs",
           help="calibrate every layer on the dense model's inputs (no error accumulation)")
calib, nsamples, seqlen, seed, damp = form.calibration, form.nsamples, form.seqlen, form.seed, form.damp


# --- schedule editor ----------------------------------------------------------------------------
st.subheader("Schedule")
p1, p2, p3, p4, p5 = st.columns([1.2, 1.5, 1, 1, 1.5])
widget(p1.selectbox, "preset", "Preset", list(PRESETS),
       help="log: Incremental Pruning Ratio (SlimGPT); auto: searched for the parameter budget (KL on calibration "
            "tokens). Hand edits a preset replaces are kept: you can return to them.")
widget(p2.slider, "target_ratio", "Target mean ratio", 0.0, 0.9, step=0.01)
widget(p3.number_input, "shape", "Shape (last/first)", 1.0, 20.0, step=0.5)
widget(p4.checkbox, "separate", "Separate FFN target")
if form.separate:
    widget(p5.slider, "ffn_target", "FFN mean ratio", 0.0, 0.9, step=0.01)
else:
    widget(p5.slider, "balance", "Heads share (× target)", 0.0, 2.0, step=0.05,
           help="heads take this multiple of the target mean ratio; the FFN takes what keeps the parameter cut")
if form.preset_error:
    st.error(form.preset_error)
if form.custom is not None and form.origin != "hand":
    h1, h2 = st.columns([3, 1])
    h1.info(f"Your hand-edited schedule was replaced by the **{form.preset}** preset; it is kept.")
    h2.button("Back to my hand edits", on_click=restore_hand_edits, key="restore_custom")
origin_text = {"preset": f"the {form.preset if form.preset != 'auto' else 'log'} preset",
               "auto": "the auto search", "hand": "your hand edits"}[form.origin]
st.caption(f"The per-layer ratios below come from {origin_text}.")
ss.schedule = {"hr": list(form.hr), "fr": list(form.fr)}  # what the run uses, for code that reads session state

curves_id = (ss.model_spec, calib, int(nsamples), int(seqlen), int(seed), float(damp))  # Inspect looks them up
curves_key = repr(curves_id)  # the job's label: which curves a finished job holds
model_curves = ss.error_curves.get(curves_id)
if model_curves is None and job("curves") and job("curves").state == "done" and job("curves").label == curves_key:
    model_curves = ss.error_curves[curves_id] = job("curves").result  # another tab's, or before a reload
# the editor draws the bars, the predicted errors and the sensitivity map, and recomputes them in the browser while
# a bar moves; the page hears of an edit when the drag ends
schedule_editor(editor_payload(loaded.model, model_curves, *preset_ghost(), align=align_setting(form.align)), form.hr,
                form.fr, on_edit=editor_dropped)

head_ratios = list(form.hr)
ffn_ratios = list(form.fr)
settings = PruneSettings(ratio=form.target_ratio, schedule=form.preset, shape=form.shape,
                         head_ratios=head_ratios, ffn_ratios=ffn_ratios, damp=damp, head_error=form.head_error,
                         ffn_group_floor=int(form.ffn_floor), ffn_group_ceiling=int(form.ffn_ceiling),
                         sequential=not form.dense_inputs, device=ss.get("device", "auto"),
                         align=align_setting(form.align))
blocking = problems(form, n_layers, context)  # why Start cannot run these settings (shown beside it)
preview = None
if not form.preset_error:
    try:
        preview = preview_schedule(loaded.model, settings)
    except SlimGPTError as exc:
        blocking.append(str(exc))
        st.error(str(exc))
stats_key = repr((ss.model_spec, calib, int(nsamples), int(seqlen), int(seed), float(damp)))

if preview is not None:  # the views below need a valid schedule; the Run section says why not
    info_cols = st.columns(4)
    info_cols[0].metric("Parameters after", f"{preview.params_after / 1e6:.2f} M",
                        f"-{(preview.params_before - preview.params_after) / 1e6:.2f} M")
    info_cols[1].metric("Achieved (decoder layers)", f"{preview.achieved_layer_ratio:.1%}",
                        help="rounded to whole heads / KV groups")
    info_cols[2].metric("Achieved (whole model)", f"{preview.achieved_ratio:.1%}")
    info_cols[3].metric("Requested mean", f"{sum(head_ratios + ffn_ratios) / (2 * n_layers):.1%}")

    # the same schedule as numbers: a secondary view, edited cell by cell. Its key changes after each edit, so the
    # table always starts from the schedule (a preset change or a drag in the editor is never overlaid with older edits)
    ss.setdefault("schedule_table", 0)
    with st.expander("Per-layer ratios (table)", expanded=False):
        q0 = [layer_shape(layer)[0] for layer in loaded.model.model.layers]  # separate or fused (Phi-3) q
        f0 = [layer.mlp.down_proj.in_features for layer in loaded.model.model.layers]
        ratio_column = st.column_config.NumberColumn(min_value=0.0, max_value=MAX_RATIO, step=0.0001, format="%.4f")
        table = st.data_editor(
            pd.DataFrame({"layer": range(n_layers), "heads ratio": head_ratios, "FFN ratio": ffn_ratios,
                          "heads removed": [1 - k / n for k, n in zip(preview.heads_kept, q0)],
                          "FFN removed (channels)": [1 - k / f for k, f in zip(preview.ffn_kept, f0)]}),
            key=f"schedule_table_{ss.schedule_table}", hide_index=True, column_config={
                "heads ratio": ratio_column, "FFN ratio": ratio_column,
                "heads removed": st.column_config.NumberColumn(format="%.4f"),
                "FFN removed (channels)": st.column_config.NumberColumn(format="%.4f")},
            disabled=["layer", "heads removed", "FFN removed (channels)"])
        edited = {"hr": [(i, r) for i, (r, old) in enumerate(zip(table["heads ratio"], head_ratios)) if r != old],
                  "fr": [(i, r) for i, (r, old) in enumerate(zip(table["FFN ratio"], ffn_ratios)) if r != old]}
        if edited["hr"] or edited["fr"]:
            if edit_schedule(edited) < len(edited["hr"]) + len(edited["fr"]):
                ss.table_error = (f"A per-layer ratio must be a number from 0 to {MAX_RATIO}; that cell was left as "
                                  "it was.")
            ss.schedule_table += 1
            st.rerun()
        if ss.get("table_error"):
            st.error(ss.pop("table_error"))

    # --- what-if from the error curves (no forward pass) and the auto search ----------------------------
    st.subheader("What-if (predicted on dense inputs)")
    if form.preset == "auto":
        a1, a2, a3, a4, a5 = st.columns([1, 1, 1.3, 1, 1.2])
        a1.selectbox("Budget of", ["decoder layers", "whole model"], key="auto_scope",
                     help="the target mean ratio is a fraction of the decoder layers' parameters or of the whole "
                          "model's; with 'Separate FFN target' the heads and the FFN get their own budgets")
        a2.number_input("Per-layer minimum kept", 0.0, 0.9, 0.1, step=0.05, key="auto_min_keep",
                        help="every layer keeps at least this fraction of its KV groups and of its FFN channels")
        a3.number_input("Target parameters (0: from the ratio)", 0, int(preview.params_before), 0, step=100_000,
                        key="auto_target_params")
        a4.number_input("Search seconds (0: fast only)", 0, 24 * 3600, 600, step=60, key="auto_seconds",
                        help="a first schedule comes in about a minute; the KL search then refines it for this long "
                             "(Stop keeps the best so far)")
        auto_running = bool(job("auto") and job("auto").running)
        if a5.button("Find auto schedule", disabled=auto_running, type="primary"):
            budget = BudgetSpec(ratio=form.target_ratio, scope="model" if ss.auto_scope == "whole model" else "layers",
                                target_params=int(ss.auto_target_params) or None,
                                head_ratio=form.target_ratio if form.separate else None,
                                ffn_ratio=form.ffn_target if form.separate else None,
                                min_keep=float(ss.auto_min_keep))
            config = AutoConfig(budget=budget, max_seconds=float(ss.auto_seconds), refine=ss.auto_seconds > 0,
                                shape=form.shape, seed=int(seed), damp=float(damp), device=ss.get("device", "auto"))
            ss.auto_shown = None
            submit("auto", auto_job, loaded, calib, int(nsamples), int(seqlen), int(seed), config,
                   job_label=f"{loaded.name} {form.target_ratio:.0%}")
    if model_curves is not None:
        st.caption("The schedule editor above draws every layer's predicted error and the sensitivity map from these "
                   "curves, recomputed in the browser as a bar moves.")
    else:
        st.caption("Computes every layer's OBS error curves once from the dense statistics (cached); then the schedule "
                   "editor redraws the predicted errors and the sensitivity map as a bar moves, without a forward "
                   "pass.")
        if st.button("Compute error curves", disabled=bool(job("curves") and job("curves").running)):
            submit("curves", curves_job, loaded, calib, int(nsamples), int(seqlen), int(seed), float(damp),
                   ss.get("device", "auto"), job_label=curves_key)


    PHASES = {"curves": "error curves", "database": "variant database", "sensitivity": "output sensitivity",
              "fast": "fast schedule", "search": "refining (KL search)", "done": "done"}

    def best_text(e) -> str:
        """Which schedule the editor shows now."""
        kl = f"KL {e.best_kl:.4f}" if e.best_kl == e.best_kl else "KL pending"
        return (f"editor: fast schedule, {kl}" if e.best == "fast" else
                f"editor: refined, generation {e.generation}, {kl} (fast {e.fast_kl:.4f})")

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
        events = [e for e in aj.events if e.kind == "auto"]
        last = events[-1] if events else None
        fast = [e.fast_kl for e in events if e.fast_kl == e.fast_kl]  # KL of the fast schedule, once scored
        history = ([(0, fast[-1])] if fast else []) + [(e.generation, e.best_kl) for e in events if e.phase == "search"]
        if aj.running:
            if last is None:
                text = f"auto: starting · {aj.elapsed:.0f} s"
            else:
                eta = f" · about {last.eta_s:.0f} s left" if last.eta_s is not None else ""
                text = f"auto: {PHASES.get(last.phase, last.phase)} {last.fraction:.0%}{eta} · {aj.elapsed:.0f} s"
                if last.best:
                    text += " · " + best_text(last)
            st.progress(last.fraction if last else 0.0, text=text)
            if st.button("Stop (keep the best so far)", key="stop_auto"):
                aj.cancel()
            if aj.queued:
                st.caption("queued: waits for the running job to finish")
            shown = (aj.id, tuple(last.head_ratios), tuple(last.ffn_ratios)) if last and last.head_ratios else None
            if shown is not None and ss.get("auto_shown") != shown:  # a better schedule: the sliders follow it
                ss.auto_shown = shown
                ss.auto_pending = last
                st.rerun(scope="app")
        elif aj.state == "failed":
            st.error(aj.error)
        elif aj.state == "cancelled":
            st.warning("auto was stopped before its first schedule was ready: the editor keeps its schedule.")
        if len(history) > 1:
            st.plotly_chart(charts.search_progress(history), key="auto_search_chart")
        if aj.state == "done" and take_result(aj):
            ss.auto_pending = aj.result
            st.rerun(scope="app")
        elif aj.state == "done":
            r = aj.result
            ended = "stopped" if r.stopped else "finished"
            st.success(f"auto {ended}: the editor holds {r.describe()}; {r.params_after / 1e6:.3f} M parameters. "
                       "Edit it freely.")


    live_fragment(whatif_jobs, "curves", "auto")

    # --- head-importance preview from cached dense statistics -------------------------------------
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
busy = bool(prune_job and prune_job.running)
r1, r2 = st.columns([1, 3])
if r1.button("Start pruning", type="primary", disabled=busy or bool(blocking) or preview is None):
    started = submit("prune", prune_to_workspace, loaded, settings, calib, int(nsamples), int(seqlen), int(seed),
                     device=ss.model_spec[1], job_label=f"{loaded.name} {preview.achieved_layer_ratio:.0%}")
    started.settings = frozen(form)
if blocking:
    r2.error("Start is disabled: " + " ".join(blocking))
elif busy:
    r2.caption("A pruning job is running: it must end (or be cancelled) before the next starts.")
else:
    r2.caption(f"Runs {form.describe_calibration()}.")


def load_job_settings(settings: dict) -> None:
    """The editor takes a job's frozen settings (the button beside a job whose settings differ from the editor's)."""
    f = PruneForm(**{k: v for k, v in settings.items() if k in PRUNE_FORM_FIELDS})
    save_form(f)


def job_settings(pj) -> None:
    """A job's frozen settings beside it, and a way back to them when the editor has moved on."""
    if not pj.settings:
        return
    st.caption(f"**{pj.label}** was started with: {describe_frozen(pj.settings)}.")
    if {k: v for k, v in pj.settings.items() if k != "custom"} != {k: v for k, v in frozen(load_form()).items()
                                                                   if k != "custom"}:
        if st.button("The editor has changed since: show this job's settings in it", key=f"job_settings_{pj.id}"):
            load_job_settings(pj.settings)
            st.rerun(scope="app")  # the whole page shows them, not only this live view


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
                   f"({r.achieved_ratio:.1%} of all), calibrated on {calibration_text(r.settings)}. Saved as run "
                   f"**{info.title}** in the workspace; evaluate or export it on the next pages.")
    elif pj.state == "cancelled":
        st.warning("Pruning was cancelled; nothing was written and the loaded model is unchanged.")
    elif pj.state == "failed":
        st.error(pj.error)
    job_settings(pj)
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
