"""Continued pre-training with dynamic batch loading (Sheared-LLaMA, Algorithm 1; SPEC §9), optionally with
LoRA (the recovery's peft machinery) and Minitron's logit distillation from a teacher.

    result = pretrain(model, tokenizer, PretrainSettings(data=["c4", "tinystories"], steps=400),
                      reference=source_model, teacher=None, callback=print, should_stop=lambda: False)

Any run trains (sheared, pruned by any method, mixed per-layer shapes): the loop is training.train; this module
hands it the domain sampler, the loss (labels, distillation or both) and, every `update_every` steps, the update
of the domain weights from each domain's held-out loss against its reference loss (the source model's loss on
that domain's held-out windows). `pretrain` changes `model` in place (pass a copy to keep the original); nothing
is written to disk here (save_pretrained_run writes the run at once)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from slimgpt_core.base import devices
from slimgpt_core.base.cache import forget_fingerprint
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.data import window_bos
from slimgpt_core.evaluation.evaluate import perplexity
from slimgpt_core.training.checkpoints import CheckpointPlan
from slimgpt_core.training.distributed import (broadcast_tensor, check_batch_rows, gathered_model, is_main,
                                               rank_world, resharded, shard_model, to_device)
from slimgpt_core.training.distill import check_teacher, distillation_loss_fn
from slimgpt_core.training.domain_mix import update_domain_weights
from slimgpt_core.training.domains import DomainSampler, check_domains, load_domains, perplexity_tokens
from slimgpt_core.training.loop import (OptimizerConfig, TrainPlan, TrainStep, autocast_context, final_perplexity,
                                        heldout_loss, run_training, trained_report, training_bytes, uses_bf16)
from slimgpt_core.training.recover import add_lora, drop_lora, merge_lora, resolve_targets
from slimgpt_core.training.settings import PretrainSettings


def check_pretrain_settings(settings: PretrainSettings) -> None:
    """One sentence for the first bad value or unknown domain, before anything is loaded."""
    settings.validate()
    check_domains(settings.data)


@dataclass
class PretrainPhase:
    phase: str  # data | ppl-before | reference | train | merge | ppl-after | done
    elapsed_s: float
    kind: str = "pretrain-phase"


@dataclass
class PretrainStep:
    """One optimizer step: its loss, the latest per-domain held-out losses and the domain weights it drew from."""
    step: int
    steps: int
    loss: float  # training loss of the step (labels, KL or their mix)
    lr: float
    domain_losses: dict[str, float]  # latest held-out loss per domain (nats/token)
    weights: dict[str, float]  # the mix this step's sequences were drawn from
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    kind: str = "pretrain-step"


@dataclass
class MixUpdate:
    """Dynamic batch loading at one step: per-domain held-out vs reference loss, weights before and after."""
    step: int
    losses: dict[str, float]
    reference: dict[str, float]
    weights_before: dict[str, float]
    weights_after: dict[str, float]
    kind: str = "domain-mix"


@dataclass
class PretrainResult:
    model: torch.nn.Module  # plain weights (LoRA merged), same class as the input
    settings: PretrainSettings
    steps: list[PretrainStep]
    mix: list[dict]  # [{"step", "losses", "weights"}]: step 0 before training, then each update, then the end
    updates: list[MixUpdate]
    reference: dict[str, float]
    reference_source: str
    domains: list[str]  # one line per domain: where its text comes from, held-out / train windows
    sequences_per_domain: dict[str, int]
    tokens_seen: int
    ppl_before: dict[str, dict]  # text → evaluate.PerplexityResult as a dict
    ppl_after: dict[str, dict]
    teacher: str | None
    distill_weight: float
    trainable_parameters: int
    seconds: float
    train_seconds: float
    peak_memory_mb: float
    device: str
    autocast: str
    merge_max_abs_diff: float | None  # LoRA only: merged vs adapter-wrapped logits on one held-out batch

    def record(self, source: str = "") -> dict:
        """What report.json keeps under `pretrain`."""
        s = self.settings
        return {
            "source_run": source, "data": list(s.data), "domains": self.domains, "steps": s.steps,
            "dynamic_mix": s.dynamic_mix, "update_every": s.every, "mix_variant": s.mix_variant,
            "reference": self.reference, "reference_source": self.reference_source, "mix": self.mix,
            "updates": [asdict(u) for u in self.updates], "sequences_per_domain": self.sequences_per_domain,
            "lr": s.lr, "schedule": f"{s.schedule}, linear warm-up {s.warmup_steps} steps", "betas": list(s.betas),
            "seqlen": s.seqlen, "batch_size": s.batch_size, "grad_accumulation": s.grad_accumulation,
            "heldout_windows": s.heldout, "lora": asdict_lora(s), "teacher": self.teacher,
            "distill_weight": self.distill_weight, "seed": s.seed, "device": self.device, "autocast": self.autocast,
            "trainable_parameters": self.trainable_parameters, "tokens_seen": self.tokens_seen,
            "seconds": round(self.seconds, 2), "train_seconds": round(self.train_seconds, 2),
            "peak_memory_mb": round(self.peak_memory_mb, 1), "merge_max_abs_diff": self.merge_max_abs_diff,
            "loss_curve": [{"step": e.step, "loss": e.loss, "lr": e.lr, "tokens_per_s": e.tokens_per_s,
                            "weights": e.weights} for e in self.steps],
            "ppl_before": self.ppl_before, "ppl_after": self.ppl_after,
        }


def asdict_lora(s: PretrainSettings) -> dict | None:
    if not s.lora:
        return None
    return {"rank": s.rank, "alpha": s.alpha, "dropout": s.dropout, "target_modules": list(s.target_modules)}


def pretrain_memory_bytes(model, settings: PretrainSettings, teacher=None) -> int:
    """A rough upper estimate: mask-learning's estimate for the trained weights (full fine-tuning: weights,
    gradients, two AdamW moments; LoRA: the weights and small adapters) and activations, plus the teacher's
    weights and its logits."""

    need = training_bytes(model, settings.batch_size, settings.seqlen, train_weights=not settings.lora)
    cfg = model.config
    if settings.lora:
        need += 16 * settings.rank * 2 * cfg.hidden_size * cfg.num_hidden_layers * len(settings.target_modules)
    if teacher is not None:
        need += sum(p.numel() * p.element_size() for p in teacher.parameters())
        need += 2 * settings.batch_size * settings.seqlen * cfg.vocab_size * 4
    return int(need)


def check_memory(model, settings: PretrainSettings, device: torch.device, teacher=None) -> None:
    need = pretrain_memory_bytes(model, settings, teacher)
    if device.type == "cpu":  # the weights are already in memory
        need -= sum(p.numel() * p.element_size() for m in (model, teacher) if m is not None for p in m.parameters())
    lora = "" if settings.lora else ", pass --lora"
    devices.check_free_memory(need, device, "continued pre-training needs about",
                              f"lower --batch-size ({settings.batch_size}; raise --grad-accumulation to keep the "
                              f"effective batch) or --seqlen ({settings.seqlen}){lora}, or use a device with more memory")


def _batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "labels": w} for w in windows.split(batch_size)]


def _domain_losses(model, heldout: dict[str, list], device, bf16) -> dict[str, float]:
    return {name: heldout_loss(model, batches, device, bf16) for name, batches in heldout.items()}


def _perplexities(model, tokenizer, settings: PretrainSettings, device, should_stop) -> dict[str, dict]:
    out = {}
    for name in settings.ppl:
        r = perplexity(model, perplexity_tokens(tokenizer, name), settings.ppl_seqlen, 8, settings.ppl_windows,
                       device, name, should_stop=should_stop, bos=window_bos(tokenizer))
        out[name] = asdict(r)
    return out


@dataclass
class _Run:
    """What one continued pre-training carries from step to step: dynamic batch loading's state and history
    (saved in checkpoints, so a resumed run reports the whole curve) and where events go."""
    settings: PretrainSettings
    device: torch.device
    names: list[str]
    heldout: dict[str, list]
    emit: Callable
    ref: torch.Tensor | None = None
    sampler: DomainSampler | None = None
    wrapped: torch.nn.Module | None = None  # the peft model while LoRA adapters train
    mix: list[dict] = field(default_factory=list)
    updates: list[MixUpdate] = field(default_factory=list)
    latest: dict[str, float] = field(default_factory=dict)
    events: list[PretrainStep] = field(default_factory=list)
    drawn_for_step: dict[str, float] = field(default_factory=dict)

    def as_dict(self, t) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, t)}

    def state(self) -> dict:
        return {"mix": self.mix, "updates": [asdict(u) for u in self.updates], "latest": self.latest,
                "events": [asdict(e) for e in self.events], "drawn_for_step": self.drawn_for_step}

    def restore(self, state: dict) -> None:
        self.mix, self.latest, self.drawn_for_step = state["mix"], state["latest"], state["drawn_for_step"]
        self.updates = [MixUpdate(**u) for u in state["updates"]]
        self.events = [PretrainStep(**e) for e in state["events"]]


def _checked(model, settings: PretrainSettings, teacher) -> tuple[PretrainSettings, float]:
    """The settings with LoRA targets resolved, and the distillation weight; one sentence for what cannot run."""
    check_pretrain_settings(settings)
    if teacher is not None:
        check_teacher(model, teacher)
    distill = settings.distill(teacher is not None)
    if distill > 0 and teacher is None:
        raise SlimGPTError("a distill weight above 0 needs a teacher (--teacher)")
    if settings.lora:
        settings = dataclasses.replace(settings, target_modules=resolve_targets(model, settings.target_modules))
    check_batch_rows(settings.batch_size)
    return settings, distill


def _reference(run: _Run, model, reference, teacher, reference_name: str) -> tuple[torch.Tensor, str]:
    """Per-domain reference losses and where they come from."""
    s = run.settings
    if s.reference_losses is not None:
        return torch.tensor(s.reference_losses, dtype=torch.float64), "given"
    judge = reference.to(run.device) if reference is not None else model
    ref = torch.tensor(list(_domain_losses(judge, run.heldout, run.device, s.bf16).values()), dtype=torch.float64)
    source = reference_name or ("the reference model" if reference is not None else
                                "the model itself before training (no source model known)")
    if reference is not None and reference is not teacher:
        reference.to("cpu")
    return ref, source


def _after_step(run: _Run, net, step: int) -> None:
    """Dynamic batch loading after an update: every `every` steps the domain weights move by the held-out losses
    (reduced over the ranks, then rank 0's weights broadcast, so every rank draws the same mix)."""
    s = run.settings
    run.drawn_for_step = run.as_dict(run.sampler.weights)  # what this step drew from (an update applies next)
    last = step == s.steps
    if not (last or (s.dynamic_mix and step % s.every == 0)):
        return
    losses = _domain_losses(net, run.heldout, run.device, s.bf16)
    run.latest.update(losses)
    before = run.sampler.weights
    if s.dynamic_mix and not last:
        new = broadcast_tensor(update_domain_weights(before, torch.tensor(list(losses.values()), dtype=torch.float64),
                                                     run.ref, s.mix_variant))
        update = MixUpdate(step, losses, run.as_dict(run.ref), run.as_dict(before), run.as_dict(new))
        run.updates.append(update)
        run.emit(update)
        run.sampler.weights = new
    run.mix.append({"step": step, "losses": losses, "weights": run.as_dict(run.sampler.weights)})


def _relay(run: _Run, event) -> None:
    if isinstance(event, TrainStep):
        e = PretrainStep(event.step, event.steps, event.train_loss, event.lr, dict(run.latest), run.drawn_for_step,
                         event.tokens_per_s, event.elapsed_s, event.eta_s)
        run.events.append(e)
        run.emit(e)


def _shard(run: _Run, model):
    """(the model to train: LoRA-wrapped or all weights trainable, it sharded over the ranks, its trainable
    parameter count). Sharding comes before any held-out loss: ranks other than 0 may hold a meta shell."""
    s = run.settings
    if s.lora:
        run.wrapped = add_lora(model, s.rank, s.alpha, s.dropout, s.target_modules, s.seed)
    net = run.wrapped if s.lora else model.requires_grad_(True)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return net, shard_model(net, run.device, s.bf16, s.activation_checkpointing), trainable


def _train_model(run: _Run, net, sharded, domains, weights: torch.Tensor, loss_fn, should_stop):
    """Full or LoRA training of the sharded model; the trained model (adapter-wrapped with LoRA) gathered back
    as a plain model on rank 0 when it was sharded (None on the other ranks)."""
    s = run.settings
    run.sampler = DomainSampler(domains, weights, s.batch_size, s.seed)
    run.drawn_for_step = run.as_dict(weights)
    checkpoint = CheckpointPlan(s.checkpoint_folder, s.checkpoint_every, s.resume, run.state, run.restore) \
        if s.checkpoint_folder else None
    optim = OptimizerConfig(lr=s.lr, warmup_steps=s.warmup_steps, schedule=s.schedule, betas=s.betas)
    plan = TrainPlan(s.steps, optim, run.device, s.grad_accumulation, None, 0, s.bf16, lambda e: _relay(run, e),
                     should_stop, loss_fn, lambda step: _after_step(run, sharded, step), checkpoint)
    trained = run_training(sharded, run.sampler, plan)
    if s.activation_checkpointing:
        (net.get_base_model() if s.lora else net).activation_checkpointing_disable()
    if rank_world()[1] > 1:
        rebuild = (lambda fresh: add_lora(fresh, s.rank, s.alpha, s.dropout, s.target_modules)) if s.lora else None
        net = gathered_model(sharded, rebuild)
        if net is not None:
            net.to(run.device)
    return net, trained


def _put_back(run: _Run, model, flags: dict[str, bool], home, teacher, exc: BaseException) -> None:
    """Cancelled or failed in one process: adapters dropped (full fine-tuning changed the weights in place;
    callers pass a copy), flags and devices as they were. A sharded model cannot be put back."""
    if rank_world()[1] == 1:
        base = drop_lora(run.wrapped) if run.wrapped is not None else model
        for name, p in base.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        base.to(home)
    if teacher is not None:
        teacher.to("cpu")
    s = run.settings
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        raise SlimGPTError(f"out of memory on {run.device} while training: lower --batch-size ({s.batch_size}) or "
                           f"--seqlen ({s.seqlen}), or pass --lora") from None


def _merged(run: _Run, net, flags: dict[str, bool], probe_windows: torch.Tensor):
    """The trained model as plain weights (LoRA merged) and the largest logit change merging caused."""
    diff = None
    model = net
    if run.settings.lora:  # fold the adapters into the weights: the plain class comes back
        probe = _batches(probe_windows, run.settings.batch_size)[0]["input_ids"].to(run.device)
        with torch.no_grad(), autocast_context(run.device, run.settings.bf16):
            wrapped = net(input_ids=probe).logits.float()
        model = merge_lora(net)
        with torch.no_grad(), autocast_context(run.device, run.settings.bf16):
            diff = float((model(input_ids=probe).logits.float() - wrapped).abs().max())
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
    model.eval()
    forget_fingerprint(model)  # weights changed in place: cached results keyed on the old ones no longer apply
    return model, diff


def pretrain(model, tokenizer, settings: PretrainSettings, reference=None, teacher=None,
             callback: Callable | None = None, should_stop: Callable[[], bool] | None = None,
             reference_name: str = "", teacher_name: str = "") -> PretrainResult | None:
    """Continued pre-training of `model` on the mix of `settings.data` (see the module's doc).

    `reference`: the model whose per-domain held-out loss is the reference loss (the source model); None with
    no `settings.reference_losses`: the model's own loss before training. `teacher`: distill from it (same
    vocabulary). Events: PretrainPhase between stages, PretrainStep per step, MixUpdate at each update.
    `should_stop()` is checked between steps (JobCancelled). Under torchrun every rank calls this; rank 0 alone
    emits events and gets the result (None elsewhere)."""
    settings, distill = _checked(model, settings, teacher)
    device = resolve_device(settings.device)
    check_memory(model, settings, device, teacher)
    t_start = time.perf_counter()
    emit = (callback or (lambda e: None)) if is_main() else (lambda e: None)
    phase = lambda name: emit(PretrainPhase(name, time.perf_counter() - t_start))  # noqa: E731
    phase("data")
    sequences = settings.steps * settings.batch_size * settings.grad_accumulation
    domains = load_domains(tokenizer, settings.data, settings.seqlen, settings.heldout, sequences)
    run = _Run(settings, device, [d.name for d in domains],
               {d.name: _batches(d.heldout, settings.batch_size) for d in domains}, emit)
    home, flags = next(model.parameters()).device, {name: p.requires_grad for name, p in model.named_parameters()}
    model = to_device(model, device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    try:
        phase("ppl-before")  # rank 0, on its whole model before sharding
        ppl_before = _perplexities(model, tokenizer, settings, device, should_stop) if is_main() else {}
        phase("reference")
        net, sharded, trainable = _shard(run, model)
        run.ref, ref_source = _reference(run, sharded, reference, teacher, reference_name)
        start = _domain_losses(sharded, run.heldout, device, settings.bf16)
        resharded(sharded)  # before the optimizer takes its parameters
        weights = torch.tensor(settings.initial_weights or [1.0] * len(domains), dtype=torch.float64)
        weights = weights / weights.sum()
        run.mix, run.latest = [{"step": 0, "losses": start, "weights": run.as_dict(weights)}], dict(start)
        phase("train")
        net, trained = _train_model(run, net, sharded, domains, weights, distillation_loss_fn(
            teacher, distill) if teacher is not None else None, should_stop)
    except BaseException as exc:
        _put_back(run, model, flags, home, teacher, exc)
        raise
    if teacher is not None:
        teacher.to("cpu")
    if net is None:
        return None
    if settings.lora:
        phase("merge")
    model, diff = _merged(run, net, flags, domains[0].heldout)
    ppl_after = final_perplexity(model, home, phase, lambda m: _perplexities(m, tokenizer, settings, device, None))
    autocast = "bf16" if uses_bf16(device, settings.bf16) else "none"
    return PretrainResult(
        model, settings, run.events, run.mix, run.updates, run.as_dict(run.ref), ref_source,
        [d.description for d in domains], {n: int(c) for n, c in zip(run.names, run.sampler.drawn)},
        trained.tokens_seen, ppl_before, ppl_after, teacher_name or (None if teacher is None else "the teacher model"),
        distill, trainable, time.perf_counter() - t_start, trained.seconds, trained.peak_memory_mb, str(device),
        autocast, diff)


TEXTS = {"tinystories": "TinyStories asset, last 1/5 of its tokens (never trained on)",
         "wikitext2": "WikiText-2 test split"}


def pretrained_report(result: PretrainResult, source_report=None, source: str = ""):
    """The source run's report (its pruning history) with the continued pre-training recorded."""
    report = trained_report(result.model, source_report, source, "pretrain", result.record(source))
    for when, values in (("before", result.ppl_before), ("after", result.ppl_after)):
        for name, value in values.items():
            report.evaluation[f"pretrain_ppl_{when}_{name}"] = value
    return report


def describe_step(e: PretrainStep) -> str:
    """One progress line: loss, per-domain held-out loss, domain weights, tokens/s, ETA."""
    held = " ".join(f"{k} {v:.3f}" for k, v in e.domain_losses.items())
    mix = " ".join(f"{k} {v:.2f}" for k, v in e.weights.items())
    return (f"step {e.step}/{e.steps} loss {e.loss:.4f} lr {e.lr:.2e} | held-out {held} | mix {mix} | "
            f"{e.tokens_per_s:.0f} tok/s ETA {e.eta_s:.0f}s")


def describe_update(u: MixUpdate) -> str:
    gaps = " ".join(f"{k} {u.losses[k]:.3f}-{u.reference[k]:.3f}={u.losses[k] - u.reference[k]:+.3f}"
                    for k in u.losses)
    after = " ".join(f"{k} {v:.2f}" for k, v in u.weights_after.items())
    return f"mix update at step {u.step}: loss-reference {gaps} -> weights {after}"


def summary(result: PretrainResult) -> dict:
    """The JSON line the command line prints."""
    out = {"steps": len(result.steps), "loss_first": round(result.steps[0].loss, 4),
           "loss_last": round(result.steps[-1].loss, 4), "domain_loss_before": result.mix[0]["losses"],
           "domain_loss_after": result.mix[-1]["losses"], "reference": result.reference,
           "weights_final": result.mix[-1]["weights"], "sequences_per_domain": result.sequences_per_domain,
           "tokens": result.tokens_seen, "seconds": round(result.seconds, 1),
           "peak_memory_mb": round(result.peak_memory_mb), "trainable_parameters": result.trainable_parameters,
           "distill_weight": result.distill_weight}
    for when, values in (("before", result.ppl_before), ("after", result.ppl_after)):
        for name, value in values.items():
            out[f"ppl_{when}_{name}"] = round(value["ppl"], 3)
            out[f"ppl_{name}"] = f"windows of {value['seqlen']}, {value['windows']} windows"
    if result.merge_max_abs_diff is not None:
        out["merge_max_abs_diff"] = result.merge_max_abs_diff
    return out
