"""Shear (Sheared-LLaMA): learn masks that take a model to a chosen shape, then cut it. A target-shape editor with
the parameter count as the user sets it, live curves while the masks learn, Cancel; the cut model becomes a run."""
import streamlit as st

from slimgpt_core.data import SOURCES
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.services.shear import check_training_memory
from slimgpt_core.methods.shear.size import parameter_count
from slimgpt_core.services.shear import shear_label, shear_to_workspace
from slimgpt_core.methods.shear.target import read_target, resolve_target, source_shape
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.base.shapes import count_parameters
from ui import shear_charts
from ui.state import current_model, job, job_progress, live_fragment, run_model, runs, submit, take_result

st.title("Shear")
st.caption("Sheared-LLaMA (Xia et al., ICLR 2024): hard-concrete masks on layers, KV groups, query heads, FFN "
           "channels and the hidden size learn which to keep while a Lagrangian drives each structure's expected "
           "size to the target; then the model is cut to exactly that shape. Authors' defaults below.")
ss = st.session_state


def describe(shape) -> str:
    def n(count: int, noun: str) -> str:
        return f"{count} {noun}{'' if count == 1 else 's'}"

    return (f"{n(shape.layers, 'layer')} · {n(shape.kv_groups, 'KV group')} × {n(shape.heads_per_group, 'query head')}"
            f" · FFN {shape.ffn} · hidden {shape.hidden}")


def live() -> None:
    """Polled while the job runs; never blocks. The job belongs to the server: a reload or a second tab finds it."""
    j = job("shear")
    if j is None:
        return
    events = list(j.events)
    start = next((e for e in events if e.kind == "shear-start"), None)
    history = [e for e in events if e.kind == "shear"]
    if j.running:
        job_progress(j, "Cancel shear", "cancel_shear")
        if history:
            s = history[-1]
            st.caption(f"**{j.label}** · step {s.step}/{s.steps} · loss {s.loss:.3f} · expected parameters "
                       f"{s.expected_parameters:,.0f} (target {start.params_target:,}) · {s.tokens_per_s:.0f} "
                       f"tokens/s · ETA {s.eta_s:.0f} s")
    elif j.state == "failed":
        st.error(j.error)
    elif j.state == "cancelled":
        st.warning("Shear was cancelled: nothing was written.")
    if j.state == "done":
        out = j.result
        st.success(f"Cut to {describe(out.target)}: {out.params_before:,} → {out.params_after:,} parameters after "
                   f"{out.tokens_seen:,} tokens in {out.seconds:.0f} s. Saved as run **{out.run.title}**: it is "
                   "listed on Runs, Evaluate and Export like every run.")
        if out.sheared_ppl:
            p = out.sheared_ppl
            st.caption(f"Perplexity ({p['dataset']} test, {p['windows']} windows × {p['seqlen']}): source "
                       f"{out.dense_ppl['ppl']:.2f} → sheared {p['ppl']:.2f}")
    if history and start is not None:
        c1, c2 = st.columns(2)
        c1.plotly_chart(shear_charts.loss_curve(history), key="shear_loss")
        c2.plotly_chart(shear_charts.expected_sizes(history, start.source), key="shear_sizes")
        st.plotly_chart(shear_charts.lambdas(history), key="shear_lambdas")
    if take_result(j):  # once the job has ended: select its run and refresh the whole page (sidebar, buttons)
        if j.state == "done":
            ss.current_run = j.result.run.name
        st.rerun()


def show_job() -> None:
    """The shear job's progress, curves and result, polled while it runs."""
    live_fragment(live, "shear")


# --- source -------------------------------------------------------------------------------------------------------
loaded = current_model()
all_runs = runs()
choices = (["loaded"] if loaded is not None else []) + list(all_runs)
if not choices:
    st.info("Load a model on the **Model** page first (or shear a run of the workspace).")
    st.stop()
if ss.get("shear_source") not in choices:
    ss.pop("shear_source", None)
source_key = st.selectbox("Source", choices, key="shear_source",
                          format_func=lambda k: f"the loaded model ({loaded.name})" if k == "loaded"
                          else f"run {all_runs[k].title}")
try:
    model = loaded.model if source_key == "loaded" else run_model(all_runs[source_key]).model
    source = source_shape(model)
except SlimGPTError as exc:
    st.error(str(exc))
    show_job()  # a job started from another source still shows
    st.stop()
source_params = count_parameters(model)
st.caption(f"Source: {describe(source)} · head size {model.model.layers[0].self_attn.head_dim} · "
           f"{source_params:,} parameters")

# --- target shape -------------------------------------------------------------------------------------------------
EDITOR = {"shear_layers": "layers", "shear_kv": "kv_groups", "shear_qpg": "heads_per_group", "shear_ffn": "ffn",
          "shear_hidden": "hidden"}
if ss.get("shear_editor_for") != (source_key, source):  # a new source: the editor starts from its shape
    for key in EDITOR:
        ss.pop(key, None)
    ss.shear_editor_for = (source_key, source)
st.subheader("Target shape")
mode = st.radio("Target", ["Set the counts", "Copy the shape of"], horizontal=True, key="shear_mode",
                label_visibility="collapsed")
raw = None
if mode == "Set the counts":
    cols = st.columns(5)
    labels = {"shear_layers": "Layers", "shear_kv": "KV groups per layer", "shear_qpg": "Query heads per group",
              "shear_ffn": "FFN width", "shear_hidden": "Hidden size"}
    values = {}
    for col, (key, field) in zip(cols, EDITOR.items()):
        values[field] = int(col.number_input(labels[key], min_value=0, value=getattr(source, field), step=1, key=key,
                                             disabled=key == "shear_qpg" and source.heads_per_group == 1,
                                             help="every KV group keeps the same number (GQA stays valid)"
                                             if key == "shear_qpg" else None))
    raw = {"layers": values["layers"], "kv_groups": values["kv_groups"],
           "heads": values["kv_groups"] * values["heads_per_group"], "ffn": values["ffn"], "hidden": values["hidden"]}
else:
    others = [k for k in all_runs if k != source_key] + ["other"]
    if ss.get("shear_copy_from") not in others:
        ss.pop("shear_copy_from", None)
    pick = st.selectbox("Copy the shape of", others, key="shear_copy_from",
                        format_func=lambda k: "a config.json, model folder, hub id or JSON…" if k == "other"
                        else f"run {all_runs[k].title}")
    spec = str(all_runs[pick].path) if pick != "other" else st.text_input(
        "As `shear --target` takes it", key="shear_copy_spec",
        placeholder='{"layers": 4, "kv_groups": 2, "ffn": 128} · path/to/config.json · a model folder').strip()
    if spec:
        try:
            raw = read_target(spec)
        except SlimGPTError as exc:
            st.error(str(exc))
target = None
if raw is not None:
    try:
        target = resolve_target(raw, model)
    except SlimGPTError as exc:
        st.error(str(exc))
if target is not None:
    after = parameter_count(model, target)
    m1, m2 = st.columns([1, 3])
    m1.metric("Parameters after the cut", f"{after:,}", f"{after - source_params:,}", delta_color="off")
    m2.metric("Share of the source kept", f"{after / source_params:.1%}", help=describe(target))
    st.caption(f"Target: {describe(target)}")

# --- training -------------------------------------------------------------------------------------------------------
st.subheader("Mask learning")
context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
c1, c2, c3, c4 = st.columns(4)
steps = c1.number_input("Steps", 1, 1_000_000, 200, key="shear_steps")
batch = c2.number_input("Batch size", 1, 1024, 4, key="shear_batch")
seqlen = c3.number_input("Sequence length", 16, context, min(256, context), step=16, key="shear_seqlen")
seed = c4.number_input("Seed", 0, 10**6, 0, key="shear_seed")
d1, d2, d3, d4 = st.columns(4)
data = d1.multiselect("Data domains", list(SOURCES), ["c4", "tinystories"], key="shear_data",
                      help="an equal mix; wikitext2 trains on its validation split, never on the test split")
lr = d2.number_input("Weights' learning rate", 0.0, 1.0, 1e-4, format="%.1e", key="shear_lr")
mask_lr = d3.number_input("Masks' learning rate", 0.0, 100.0, 1.0, key="shear_mask_lr")
lambda_lr = d4.number_input("λ learning rate (ascent)", 0.0, 100.0, 1.0, key="shear_lambda_lr")
e1, e2 = st.columns(2)
freeze = e1.checkbox("Masks only (weights frozen)", key="shear_freeze",
                     help="about twice as fast and half the memory; the weights do not adapt to the cut")
ppl_windows = e2.number_input("Perplexity windows (WikiText-2 test, 128 tokens; 0: skip)", 0, 10_000, 16,
                              key="shear_ppl_windows")

shear_job = job("shear")
if st.button("Start shearing", type="primary", disabled=target is None or bool(shear_job and shear_job.running)):
    device = (ss.get("model_spec") or ("", "auto"))[1]
    settings = ShearSettings(steps=int(steps), batch_size=int(batch), lr=float(lr), mask_lr=float(mask_lr),
                             lambda_lr=float(lambda_lr), train_weights=not freeze, seed=int(seed), device=device)
    try:  # one sentence, before any work
        if target is None:
            raise SlimGPTError("set a valid target shape first")
        if not data:
            raise SlimGPTError("choose at least one data domain")
        check_training_memory(model, settings.batch_size, int(seqlen), resolve_device(device), settings.train_weights)
    except SlimGPTError as exc:
        st.error(str(exc))
    else:
        name = loaded.name if source_key == "loaded" else source_key
        submit("shear", shear_to_workspace, loaded if source_key == "loaded" else all_runs[source_key].path,
               target.to_dict(), settings, list(data), int(seqlen), "wikitext2" if ppl_windows else None, 128,
               int(ppl_windows) or None, job_label=shear_label(name, target))

show_job()
