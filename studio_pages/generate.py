"""Generations side by side: the same prompts through the dense model and chosen runs, greedy, streamed into one
column per model as the tokens come, with each model's tokens/s."""
import streamlit as st

from slimgpt_core.services.generation import DEFAULT_PROMPTS, GGUF_PREFIX, generate_side_by_side
from slimgpt_core.evaluation.llamacpp import llama_cpp_available
from ui.state import current_run, job, job_alert, job_progress, live_fragment, require_model, runs, submit

st.title("Generate")
loaded = require_model()
if loaded is None:
    st.stop()
all_runs = runs()
labels = {name: info.title for name, info in all_runs.items()}
made = current_run()
st.session_state.setdefault("gen_runs", [made.name] if made else [])
st.session_state.gen_runs = [r for r in st.session_state.gen_runs if r in labels]  # runs may be gone
chosen = st.multiselect("Runs", list(labels), format_func=labels.get, key="gen_runs")
include_dense = st.checkbox(f"Include the dense model ({loaded.name})", value=True, key="gen_dense")
prompts = st.text_area("Prompts, one per line", "\n".join(DEFAULT_PROMPTS), key="gen_prompts", height=110)
max_new = st.number_input("Max new tokens", 1, 1024, 48, step=8, key="gen_max_new")
with_llamacpp = st.checkbox("Also from llama.cpp (each model's q8_0 GGUF, 2 threads)", key="gen_llamacpp",
                            disabled=not llama_cpp_available(),
                            help="llama.cpp is not built yet: the Export page builds it" if not llama_cpp_available()
                            else "each model is exported once to a q8_0 GGUF in the workspace's exports")

spec = st.session_state.model_spec  # (name, device, dtype) of the dense model
models = ([(f"dense · {loaded.name}", spec[0])] if include_dense else []) + \
         [(labels[name], str(all_runs[name].path)) for name in chosen]
if with_llamacpp and llama_cpp_available():
    models += [(f"{label} · llama.cpp q8_0", GGUF_PREFIX + source) for label, source in models]
gen_job = job("generate")
if st.button("Generate", type="primary", disabled=bool(gen_job and gen_job.running) or not models):
    # not a heavy job: it takes turns with nothing and the page keeps drawing tokens while it runs
    submit("generate", generate_side_by_side, models, prompts.splitlines(), int(max_new), spec[1], spec[2],
           heavy=False, job_label=", ".join(label for label, _ in models))


def show_generations() -> None:
    gj = job("generate")
    if gj is None:
        return
    events = list(gj.events)
    started = next((e for e in events if getattr(e, "kind", None) == "generation"), None)
    if gj.running:
        job_progress(gj, "Stop generating", "cancel_generate", len(started.models) * len(started.prompts)
                     if started else None)
    else:
        job_alert(gj, "Stopped.")
    if started is None:
        return
    latest = {(e.model, e.prompt): e for e in events if getattr(e, "kind", None) == "token"}
    finished = {(g.model, g.prompt): g for g in (gj.result or [])}
    for k, prompt in enumerate(started.prompts):
        st.markdown(f"**{prompt}**")
        for col, model in zip(st.columns(len(started.models)), started.models):
            col.caption(model)
            streamed = latest.get((model, k))
            col.markdown(streamed.text if streamed else "…")
            done = finished.get((model, prompt))
            if done is not None:
                rate = f"{done.tokens_per_s:.1f} tokens/s" if done.tokens_per_s else "—"
                col.caption(f"{len(done.token_ids)} tokens · {rate} · first token {done.first_token_s * 1000:.0f} ms"
                            f" · {done.device}")
            elif streamed is not None:
                col.caption(f"{streamed.new_tokens} tokens · {streamed.seconds:.1f} s")


live_fragment(show_generations, "generate")
