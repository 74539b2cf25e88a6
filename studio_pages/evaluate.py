"""Perplexity, zero-shot tasks and speed: dense and pruned side by side. Every measurement is stored with its run."""
import pandas as pd
import streamlit as st

from slimgpt_core.evaluation.llamacpp import llama_cpp_available
from slimgpt_core.workspace.gguf import llamacpp_speed
from slimgpt_core.services.evaluate import evaluate
from slimgpt_core.workspace.store import dense_evaluations_folder
from slimgpt_core.evaluation.zeroshot import TASKS
from ui import charts
from ui.state import current_run, finished_job, job, live_fragment, require_model, run_model, runs, submit

st.title("Evaluate")
loaded = require_model()
if loaded is None:
    st.stop()
all_runs = runs()
labels = {name: info.title for name, info in all_runs.items()}
# preselect what the user just made and the run it came from (a twin's base, a recovery's source)
made = current_run()
default = [made.name] + [s for s in [made.summary.get("source_run")] if s in labels] if made else []
chosen = st.multiselect("Pruned runs", list(labels), default=default, format_func=labels.get, key="eval_runs")
include_dense = st.checkbox("Include the dense model", value=True, key="eval_dense")
c1, c2, c3 = st.columns(3)
ppl = c1.selectbox("Perplexity text", ["wikitext2", "tinystories", "c4", "none"], key="eval_ppl")
seqlen = c2.number_input("Window length", 16, 4096, 128, step=16, key="eval_seqlen")
windows = c3.number_input("Windows (0: all)", 0, 100000, 32, key="eval_windows")
t1, t2, t3, t4 = st.columns([3, 1, 1, 1])
tasks = t1.multiselect("Zero-shot tasks", list(TASKS), default=[], key="eval_tasks")
limit = t2.number_input("Limit per task", 1, 100000, 50, key="eval_limit")
speed = t3.checkbox("Speed and memory", key="eval_speed")
cpp_speed = t4.checkbox("llama.cpp speed", key="eval_llamacpp", disabled=not llama_cpp_available(),
                        help="each model as a q8_0 GGUF in llama.cpp at 2 threads: prefill 128 tokens, decode 64 "
                             "(the Export page builds llama.cpp if it is missing)")

eval_job = job("eval")
if st.button("Evaluate", type="primary", disabled=bool(eval_job and eval_job.running)
             or not (chosen or include_dense)):
    models, folders = {}, {}
    if include_dense:
        models["dense"] = (loaded.model, loaded.tokenizer)
        folders["dense"] = dense_evaluations_folder(loaded.name)
    for name in chosen:
        run = run_model(all_runs[name])
        models[labels[name]] = (run.model, run.tokenizer)
        folders[labels[name]] = all_runs[name].path
    submit("eval", evaluate, models, None if ppl == "none" else ppl, int(seqlen), int(windows) or None, tasks,
           int(limit), speed, st.session_state.model_spec[1], record_to=folders,
           job_label=", ".join(models))
    if cpp_speed:
        sources = {**({"dense": loaded} if include_dense else {}),
                   **{labels[name]: all_runs[name].path for name in chosen}}
        submit("eval_llamacpp", llamacpp_speed, sources, job_label=", ".join(sources))


def show_results() -> None:
    ej = finished_job("eval", "Cancel evaluation")
    if ej is None:
        return
    results = ej.result
    rows = []
    for r in results:
        row = {"model": r.label, "parameters (M)": round(r.parameters / 1e6, 3)}
        if r.perplexity:
            row[f"ppl ({r.perplexity['dataset']}, {r.perplexity['seqlen']})"] = round(r.perplexity["ppl"], 3)
        for t, v in r.tasks.items():
            row[f"{t} acc"] = round(v["acc"], 4)
        if r.tasks:
            row["mean acc"] = round(sum(v["acc"] for v in r.tasks.values()) / len(r.tasks), 4)
        if r.speed:
            for p in r.speed["points"]:
                row[f"decode tok/s b{p['batch']}"] = round(p["decode_tokens_per_s"], 1)
                row[f"prefill ms b{p['batch']}"] = round(p["prefill_ms"], 1)
            row["weights MB"] = round(r.speed["weights_mb"], 1)
            row["KV KB/token"] = round(r.speed["kv_cache_kb_per_token"], 2)
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    # one chart per row: a half-width column crushed the bars and their labels
    if any(r.perplexity for r in results):
        st.plotly_chart(charts.perplexity_bars(results), key="eval_ppl_chart")
    if any(r.tasks for r in results):
        st.plotly_chart(charts.evaluation_bars(results), key="eval_task_chart")


live_fragment(show_results, "eval")


def show_llamacpp() -> None:
    cj = finished_job("eval_llamacpp", "Cancel llama.cpp speed")
    if cj is None:
        return
    transformers_rates = {}
    ej = job("eval")
    if ej is not None and ej.state == "done":
        transformers_rates = {r.label: r.speed["points"][0]["decode_tokens_per_s"] for r in ej.result if r.speed}
    st.subheader("llama.cpp beside transformers")
    st.dataframe(pd.DataFrame([{
        "model": row["model"], "llama.cpp weights": row["weight_type"], "threads": row["threads"],
        f"prefill tok/s ({row['prompt_tokens']})": round(row["prefill_tokens_per_s"], 1),
        f"decode tok/s ({row['new_tokens']} new)": round(row["decode_tokens_per_s"], 1),
        "decode spread": f"{row['decode_spread'][0]:.1f}–{row['decode_spread'][1]:.1f}",
        "transformers decode tok/s b1": (round(transformers_rates[row["model"]], 1)
                                         if row["model"] in transformers_rates else None)} for row in cj.result]),
        hide_index=True)
    st.caption(f"Medians of {cj.result[0]['repeats']} repeats, the models alternated; llama.cpp's threads spin, so "
               "another busy process on the machine lowers its figures.")


live_fragment(show_llamacpp, "eval_llamacpp")
