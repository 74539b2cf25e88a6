"""Continued pre-training (Sheared-LLaMA's second stage) of any run: a mix of domains whose weights move toward the
domains that lag their reference loss, full weights or LoRA, optionally distilled from the source model. Live
curves, Cancel; the result becomes a run."""
import streamlit as st

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.training.domains import DOMAINS
from slimgpt_core.training.pretrain import check_pretrain_settings
from slimgpt_core.training.settings import PretrainSettings
from slimgpt_core.services.pretrain import pretrain_to_workspace
from ui import pretrain_charts
from ui.state import job, job_progress, live_fragment, runs, submit, take_result

st.title("Continued pre-training")
st.caption("Train a pruned or sheared run further on a mix of C4, TinyStories and WikiText-2 (its validation split; "
           "the test split is never trained on). With dynamic batch loading (Sheared-LLaMA, Algorithm 1) the mix "
           "moves every few steps toward the domains whose held-out loss lies furthest above the reference loss "
           "(the loss of the model the run was pruned from).")
ss = st.session_state


def live() -> None:
    """Polled while the job runs; never blocks. The job belongs to the server: a reload or a second tab finds it."""
    j = job("pretrain")
    if j is None:
        return
    events = list(j.events)
    steps = [e for e in events if getattr(e, "kind", None) == "pretrain-step"]
    updates = [e for e in events if getattr(e, "kind", None) == "domain-mix"]
    if j.running:
        job_progress(j, "Cancel continued pre-training", "cancel_pretrain")
        if steps:
            s = steps[-1]
            mix = " · ".join(f"{k} {v:.2f}" for k, v in s.weights.items())
            st.caption(f"**{j.label}** · step {s.step}/{s.steps} · loss {s.loss:.3f} · mix {mix} · "
                       f"{s.tokens_per_s:.0f} tokens/s · ETA {s.eta_s:.0f} s")
    elif j.state == "failed":
        st.error(j.error)
    elif j.state == "cancelled":
        st.warning("Continued pre-training was cancelled: nothing was written.")
    if j.state == "done":
        out = j.result
        st.success(f"Trained on {out.tokens_seen:,} tokens in {out.seconds:.0f} s. Saved as run "
                   f"**{out.run.title}**: it is listed on Runs, Evaluate and Export like every run.")
        for text, after in out.ppl_after.items():
            before = out.ppl_before.get(text)
            st.caption(f"Perplexity ({text} test, {after['windows']} windows × {after['seqlen']}): "
                       + (f"{before['ppl']:.2f} → " if before else "") + f"{after['ppl']:.2f}")
    if steps:
        reference = updates[-1].reference if updates else {}
        c1, c2, c3 = st.columns(3)
        c1.plotly_chart(pretrain_charts.loss_curve(steps), key="pretrain_loss")
        c2.plotly_chart(pretrain_charts.domain_losses(steps, reference), key="pretrain_domains")
        c3.plotly_chart(pretrain_charts.domain_weights(steps), key="pretrain_weights")
    if take_result(j):  # once the job has ended: select its run and refresh the whole page
        if j.state == "done":
            ss.current_run = j.result.run.name
        st.rerun()


def show_job() -> None:
    live_fragment(live, "pretrain")


all_runs = runs()
if not all_runs:
    st.info("Make a run first (**Prune** or **Shear**): continued pre-training trains a run of the workspace.")
    show_job()
    st.stop()
names = list(all_runs)
if ss.get("pretrain_source") not in names:
    ss.pretrain_source = ss.get("current_run") if ss.get("current_run") in names else names[0]
source_key = st.selectbox("Run", names, key="pretrain_source", format_func=lambda k: all_runs[k].title)
source_model = all_runs[source_key].summary.get("model")  # from the listing: no report read per rerun
st.caption(f"Pruned from **{source_model}**: its held-out loss per domain is the reference." if source_model else
           "This run does not name the model it came from: the reference is the run's own loss before training.")

c1, c2, c3, c4 = st.columns(4)
steps = c1.number_input("Steps", 1, 1_000_000, 400, key="pretrain_steps")
batch = c2.number_input("Batch size", 1, 1024, 4, key="pretrain_batch")
seqlen = c3.number_input("Sequence length", 16, 8192, 256, step=16, key="pretrain_seqlen")
lr = c4.number_input("Learning rate", 0.0, 1.0, 1e-4, format="%.1e", key="pretrain_lr")
d1, d2, d3 = st.columns([2, 1, 1])
data = d1.multiselect("Domains", list(DOMAINS), ["c4", "tinystories"], key="pretrain_data")
dynamic = d2.checkbox("Dynamic batch loading", True, key="pretrain_dynamic",
                      help="off: the initial (equal) weights throughout")
every = d3.number_input("Update the mix every … steps (0: a tenth of the steps)", 0, 1_000_000, 0,
                        key="pretrain_every", disabled=not dynamic)
e1, e2, e3 = st.columns(3)
lora = e1.checkbox("LoRA (adapters only, merged at the end)", key="pretrain_lora")
rank = e1.number_input("LoRA rank", 1, 1024, 8, key="pretrain_rank", disabled=not lora)
teach = e2.checkbox("Distil from the source model (Minitron's logit KL)", key="pretrain_teacher",
                    disabled=source_model is None)
distill = e2.slider("Weight of the distillation term", 0.0, 1.0, 1.0, key="pretrain_distill",
                    disabled=not teach, help="1: KL to the teacher only; 0: the data's labels only")
ppl_windows = e3.number_input("Perplexity windows (TinyStories and WikiText-2 test, 128 tokens; 0: skip)", 0,
                              10_000, 32, key="pretrain_ppl_windows")

pretrain_job = job("pretrain")
if st.button("Start continued pre-training", type="primary",
             disabled=bool(pretrain_job and pretrain_job.running)):
    device = (ss.get("model_spec") or ("", "auto"))[1]
    settings = PretrainSettings(data=list(data), steps=int(steps), dynamic_mix=dynamic,
                                update_every=int(every) or None, lr=float(lr), seqlen=int(seqlen),
                                batch_size=int(batch), lora=lora, rank=int(rank),
                                distill_weight=float(distill) if teach else None, device=device,
                                ppl=["tinystories", "wikitext2"] if ppl_windows else [],
                                ppl_windows=int(ppl_windows) or None)
    try:  # one sentence, before any work
        if not data:
            raise SlimGPTError("choose at least one domain")
        check_pretrain_settings(settings)
    except SlimGPTError as exc:
        st.error(str(exc))
    else:
        submit("pretrain", pretrain_to_workspace, all_runs[source_key].path, settings, "source" if teach else None,
               job_label=f"{all_runs[source_key].title} · pretrain {int(steps)} steps")

show_job()
