"""Recovery: a short LoRA fine-tune of a pruned run, live loss curves, perplexity before and after."""
import streamlit as st

from slimgpt_core.training.recover import check_recover_settings
from slimgpt_core.training.settings import RecoverSettings
from slimgpt_core.services.recover import recover_to_workspace
from ui import training_charts
from ui.state import (current_model, current_run, job, job_alert, job_progress, live_fragment, require_runs, submit,
                      take_result)

st.title("Recover")
st.caption("LoRA through peft on q/k/v/o and gate/up/down, the SlimGPT paper's recipe by default (r 8, α 16, "
           "dropout 0.05, lr 1e-4 cosine, length 256). The adapters are merged and the result becomes a new run.")
all_runs = require_runs()
labels = {name: info.title for name, info in all_runs.items()}
made = current_run()
rid = st.selectbox("Run to recover", list(labels), format_func=labels.get,
                   index=list(labels).index(made.name) if made and made.name in labels else 0, key="rec_run")
c1, c2, c3, c4 = st.columns(4)
steps = c1.number_input("Steps", 1, 100000, 50, key="rec_steps")
rank = c2.number_input("Rank", 1, 256, 8, key="rec_rank")
alpha = c3.number_input("Alpha", 1.0, 1024.0, 16.0, key="rec_alpha")
lr = c4.number_input("Learning rate", 1e-6, 1e-1, 1e-4, format="%.1e", key="rec_lr")
d1, d2, d3, d4 = st.columns(4)
data = d1.selectbox("Data", ["c4", "tinystories", "wikitext2", "file…"], key="rec_data",
                    help="wikitext2 trains on the validation split; the test split is never trained on")
if data == "file…":
    data = st.text_input("Path to a .txt / .jsonl file or Alpaca .json", key="rec_path").strip() or "c4"
seqlen = d2.number_input("Sequence length", 16, 4096, 256, step=16, key="rec_seqlen")
batch = d3.number_input("Batch size", 1, 256, 4, key="rec_batch")
ppl_windows = d4.number_input("PPL windows (WikiText-2 test, 128 tokens)", 1, 10000, 32, key="rec_ppl_windows")

rj = job("recover")
if st.button("Start recovery", type="primary", disabled=bool(rj and rj.running)):
    settings = RecoverSettings(data=[data], steps=int(steps), rank=int(rank), alpha=float(alpha), lr=float(lr),
                               seqlen=int(seqlen), batch_size=int(batch), eval_every=max(1, int(steps) // 10),
                               heldout_samples=8, ppl_windows=int(ppl_windows),
                               device=(st.session_state.model_spec or ("", "auto"))[1])
    try:
        check_recover_settings(settings)
    except Exception as exc:  # one sentence, before any work
        st.error(str(exc))
    else:
        submit("recover", recover_to_workspace, all_runs[rid].path, settings, dense=current_model(),
               job_label=rid)


def live() -> None:
    j = job("recover")
    if j is None:
        return
    events = list(j.events)
    steps_done = [e for e in events if e.kind == "train-step"]
    heldout = [e for e in events if e.kind == "heldout"]
    if j.running:
        job_progress(j, "Cancel recovery", "cancel_recover", max(1, steps_done[-1].steps if steps_done else 1))
        phases = [e for e in events if e.kind == "recover-phase"]
        if steps_done:
            s = steps_done[-1]
            st.caption(f"**{j.label}** · step {s.step}/{s.steps} · train loss {s.train_loss:.3f} · "
                       f"{s.tokens_per_s:.0f} tokens/s · ETA {s.eta_s:.0f} s")
        elif phases:
            st.caption(f"**{j.label}** · {phases[-1].phase}")
    else:
        job_alert(j, "Recovery was cancelled: nothing was written.")
    if steps_done or heldout:
        st.plotly_chart(training_charts.loss_curve(steps_done, heldout), key="rec_loss")
    if j.state == "done":
        out = j.result
        st.success(f"Recovered into run **{out.run.title}**.")
        rows = {name: p["ppl"] for name, p in (("dense", out.dense_ppl), ("pruned", out.ppl_before),
                                                 ("recovered", out.ppl_after)) if p}
        if rows:
            p = out.ppl_after or out.ppl_before
            st.plotly_chart(training_charts.perplexity_before_after(
                rows, f"Perplexity ({p['dataset']}, {p['windows']} windows × {p['seqlen']})"), key="rec_ppl")
    if take_result(j) and j.state == "done":
        st.session_state.current_run = j.result.run.name
        st.rerun()


live_fragment(live, "recover")
