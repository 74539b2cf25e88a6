"""A plain gradient-descent loop over a causal LM: AdamW, warm-up + cosine schedule, gradient accumulation,
held-out loss every N steps, typed step events, cancellation between steps.

Knows nothing of LoRA or of where batches come from: recovery (recover.py) wraps the model with adapters and
hands in a batch iterator; continued pre-training (shear/pretrain.py) hands in its domain sampler, its own loss
(distillation) and a hook run after every step (the domain-weight update of dynamic batch loading).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from slimgpt_core.base.devices import peak_memory_mb
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.base.events import RunReport
from slimgpt_core.base.shapes import count_parameters, layer_shape
from slimgpt_core.training.checkpoints import CheckpointPlan, load_checkpoint, save_checkpoint
from slimgpt_core.training.distributed import all_reduce_sums, rank_rows, rank_world

IGNORE = -100  # label of tokens that carry no loss (prompt, padding); torch's cross-entropy default


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant (both after the linear warm-up)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0


@dataclass
class TrainStep:
    """One optimizer step done (after `accumulation` micro-batches)."""
    step: int  # 1-based
    steps: int
    train_loss: float  # mean over the step's micro-batches
    heldout_loss: float | None  # at evaluation steps only
    lr: float  # the rate this step used
    tokens: int  # tokens that carried loss in this step
    tokens_per_s: float  # input tokens per second of this step (forward + backward + update)
    elapsed_s: float
    eta_s: float
    kind: str = "train-step"


@dataclass
class HeldoutLoss:
    step: int  # 0: before any update
    loss: float
    kind: str = "heldout"


@dataclass
class TrainResult:
    steps: list[TrainStep] = field(default_factory=list)
    heldout: list[HeldoutLoss] = field(default_factory=list)
    tokens_seen: int = 0  # input tokens
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


def _ignore(event) -> None:
    """The listener of a run given no callback: events are dropped."""


def uses_bf16(device: torch.device, bf16: bool = True) -> bool:
    """Whether training on `device` runs in bf16 autocast: CUDA devices that support it, when asked."""
    return bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_context(device: torch.device, bf16: bool = True):
    """bf16 autocast on CUDA devices that support it; full precision otherwise (CPU)."""
    if uses_bf16(device, bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def final_perplexity(model, home, phase: Callable[[str], None], measure: Callable):
    """The trained model's perplexity (`measure(model)`) as the "ppl-after" phase, the model moved back to `home`
    whatever happens, then the "done" phase."""
    phase("ppl-after")
    try:
        result = measure(model)
    finally:
        model.to(home)
    phase("done")
    return result


def batch_loss(model, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not IGNORE."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast_context(device, bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       use_cache=False).logits
    labels = batch["labels"][:, 1:]  # IGNORE is cross_entropy's default ignore_index
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def heldout_loss(model, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, bf16: bool = True) -> float:
    """Token-weighted mean loss over held-out batches (eval mode, no dropout, no gradients); under torchrun each
    rank measures its rows of every batch and the sums are reduced, so every rank gets the same figure."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            part, counts = rank_rows(batch)
            n = loss_tokens(part) if counts else 0
            total += float(batch_loss(model, part, device, bf16)) * n
            count += n
    total, count = all_reduce_sums([total, count])
    model.train(was_training)
    return total / max(count, 1)


def make_scheduler(optimizer, config: OptimizerConfig, steps: int):
    if config.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, steps)
    return get_constant_schedule_with_warmup(optimizer, config.warmup_steps)


@dataclass
class TrainPlan:
    """What `run_training` does besides the model and its batches."""
    steps: int
    optim: OptimizerConfig
    device: torch.device
    accumulation: int = 1
    heldout: list[dict[str, torch.Tensor]] | None = None
    eval_every: int = 0
    bf16: bool = True
    callback: Callable | None = None
    should_stop: Callable[[], bool] | None = None
    loss_fn: Callable | None = None
    after_step: Callable[[int], None] | None = None
    checkpoint: CheckpointPlan | None = None


def train(model, batches: Iterator[dict[str, torch.Tensor]], steps: int, optim: OptimizerConfig,
          device: torch.device, accumulation: int = 1, heldout: list[dict[str, torch.Tensor]] | None = None,
          eval_every: int = 0, bf16: bool = True, callback: Callable | None = None,
          should_stop: Callable[[], bool] | None = None, loss_fn: Callable | None = None,
          after_step: Callable[[int], None] | None = None) -> TrainResult:
    """`run_training` with its plan given as arguments."""
    return run_training(model, batches, TrainPlan(steps, optim, device, accumulation, heldout, eval_every, bf16,
                                                  callback, should_stop, loss_fn, after_step))


class CountedStream:
    """A batch iterator with a position to resume from: it counts what it yielded, and is rebuilt and fast-
    forwarded by as many batches (the streams are seeded, so the same batches come back)."""

    def __init__(self, make: Callable[[], Iterator[dict[str, torch.Tensor]]]):
        self.make, self.stream, self.drawn = make, make(), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.drawn += 1
        return next(self.stream)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.stream, self.drawn = self.make(), 0
        for _ in range(state["drawn"]):
            next(self)


def _micro_batches(model, batches, plan: TrainPlan) -> tuple[float, int, int]:
    """Forward and backward over one step's micro-batches. Each rank trains on its rows of every micro-batch;
    its loss is scaled by its share of the micro-batch's loss tokens times the ranks, so FSDP's mean of the
    gradients is the gradient of the micro-batch's token mean, as one process computes it. Returns the step's
    loss (mean of the micro-batches' means), loss tokens and input tokens, summed over the ranks."""
    loss_fn = plan.loss_fn or batch_loss
    world = rank_world()[1]
    shares, loss_count, input_count = [], 0, 0
    for _ in range(plan.accumulation):
        batch = next(batches)
        part, _ = rank_rows(batch)
        total, mine = loss_tokens(batch), loss_tokens(part)
        share = mine / total if total else 1.0 / world
        loss = loss_fn(model, part, plan.device, plan.bf16)
        (loss * (share * world) / plan.accumulation).backward()
        shares.append(float(loss.detach()) * share)
        loss_count += total
        input_count += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return sum(all_reduce_sums(shares)) / plan.accumulation, loss_count, input_count


def _loop_state(scheduler, batches, result: TrainResult) -> dict:
    return {"scheduler": scheduler.state_dict(),
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
            "tokens_seen": result.tokens_seen, "steps": [asdict(e) for e in result.steps],
            "heldout": [asdict(h) for h in result.heldout]}


def _resume(plan: TrainPlan, model, optimizer, scheduler, batches, result: TrainResult) -> int:
    """The step a resumed run starts after (0: a fresh run)."""
    if plan.checkpoint is None or not plan.checkpoint.resume:
        return 0
    state = load_checkpoint(plan.checkpoint, model, optimizer)
    if state is None:
        return 0
    scheduler.load_state_dict(state["scheduler"])
    if state["data"] is not None:
        batches.load_state_dict(state["data"])
    result.tokens_seen = state["tokens_seen"]
    result.steps = [TrainStep(**e) for e in state["steps"]]
    result.heldout = [HeldoutLoss(**h) for h in state["heldout"]]
    return state["step"]


def run_training(model, batches: Iterator[dict[str, torch.Tensor]], plan: TrainPlan) -> TrainResult:
    """`plan.steps` optimizer steps over the parameters that require gradients, each from `plan.accumulation`
    micro-batches drawn from `batches` (dicts of input_ids, labels and optionally attention_mask).

    Held-out loss is measured before the first step, every `eval_every` steps and after the last one.
    `loss_fn(model, batch, device, bf16)` replaces the next-token cross-entropy as the training loss (held-out
    loss stays the cross-entropy); `after_step(step)` runs after each update, before that step's event.
    `should_stop()` is checked before every step; a stop raises JobCancelled (the caller decides what to keep).
    With `plan.checkpoint` a checkpoint is written every `every` steps, and a resumed run continues from it."""
    emit = plan.callback or _ignore
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.optim.lr, betas=plan.optim.betas,
                                  weight_decay=plan.optim.weight_decay)
    scheduler = make_scheduler(optimizer, plan.optim, plan.steps)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    result = TrainResult()
    done = _resume(plan, model, optimizer, scheduler, batches, result)
    if done == 0:
        _evaluate(model, plan, result, emit, 0)
    model.train()
    t_start = time.perf_counter()
    for step in range(done + 1, plan.steps + 1):
        if plan.should_stop is not None and plan.should_stop():
            raise JobCancelled("training was cancelled")
        t0, lr = time.perf_counter(), scheduler.get_last_lr()[0]
        loss, loss_count, input_count = _micro_batches(model, batches, plan)
        if plan.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, plan.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()  # gradients set to None: freed until the next backward
        seconds = time.perf_counter() - t0
        result.tokens_seen += input_count
        evaluate = (plan.eval_every and step % plan.eval_every == 0) or step == plan.steps
        held = _evaluate(model, plan, result, emit, step) if evaluate else None
        if plan.after_step is not None:
            plan.after_step(step)
        model.train()
        elapsed = time.perf_counter() - t_start
        event = TrainStep(step, plan.steps, loss, held, lr, loss_count, input_count / max(seconds, 1e-9), elapsed,
                          elapsed / (step - done) * (plan.steps - step))
        result.steps.append(event)
        emit(event)
        if plan.checkpoint and plan.checkpoint.every and step % plan.checkpoint.every == 0 and step < plan.steps:
            save_checkpoint(plan.checkpoint, step, model, optimizer, _loop_state(scheduler, batches, result))
    model.eval()
    result.seconds = time.perf_counter() - t_start
    result.peak_memory_mb = peak_memory_mb(plan.device)
    return result


def _evaluate(model, plan: TrainPlan, result: TrainResult, emit, step: int) -> float | None:
    if not plan.heldout:
        return None
    h = HeldoutLoss(step, heldout_loss(model, plan.heldout, plan.device, plan.bf16))
    result.heldout.append(h)
    emit(h)
    return h.loss


def trained_report(model, source_report=None, source: str = "", kind: str = "", record: dict | None = None):
    """The report a model trained after pruning starts from: a copy of its source run's report (its pruning
    history), or a fresh one naming `source` when it has none (a dense model). With `kind` ("recovery",
    "pretrain") the training's `record` is set there, an earlier record of that kind kept as `previous_<kind>`."""


    if source_report is not None:
        report = copy.deepcopy(source_report)
    else:
        n, n_layers = count_parameters(model), count_parameters(model.model.layers)
        report = RunReport(model=source, settings={}, head_ratios=[], ffn_ratios=[], params_before=n,
                             params_after=n, layer_params_before=n_layers, layer_params_after=n_layers)
    if kind:
        if getattr(report, kind, None):
            record[f"previous_{kind}"] = getattr(report, kind)
        setattr(report, kind, record)
    return report


def training_bytes(model, batch_size: int, seqlen: int, train_weights: bool = True) -> int:
    """A rough upper estimate of what mask learning holds: fp32 weights, their gradients and two AdamW moments,
    and the activations autograd keeps (per token and layer: a few hidden-sized tensors, the FFN's three
    intermediate ones, the attention scores; the logits three times)."""
    c = model.config
    n = count_parameters(model)
    q, _, f = layer_shape(model.model.layers[0])
    tokens = batch_size * seqlen
    per_token_layer = 12 * c.hidden_size + 4 * f + 2 * q * seqlen
    activations = tokens * (len(model.model.layers) * per_token_layer + 3 * c.vocab_size)
    return 4 * (n * (4 if train_weights else 1) + activations)
