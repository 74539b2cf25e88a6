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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from slimgpt_core.base.devices import peak_memory_mb
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.base.events import RunReport
from slimgpt_core.base.shapes import count_parameters, layer_shape

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


def autocast_context(device: torch.device, bf16: bool = True):
    """bf16 autocast on CUDA devices that support it; full precision otherwise (CPU)."""
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not IGNORE."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast_context(device, bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       use_cache=False).logits
    labels = batch["labels"][:, 1:]  # IGNORE is cross_entropy's default ignore_index
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def heldout_loss(model, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, bf16: bool = True) -> float:
    """Token-weighted mean loss over held-out batches (eval mode, no dropout, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(batch_loss(model, batch, device, bf16)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def make_scheduler(optimizer, config: OptimizerConfig, steps: int):
    if config.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, steps)
    return get_constant_schedule_with_warmup(optimizer, config.warmup_steps)


def train(model, batches: Iterator[dict[str, torch.Tensor]], steps: int, optim: OptimizerConfig,
          device: torch.device, accumulation: int = 1, heldout: list[dict[str, torch.Tensor]] | None = None,
          eval_every: int = 0, bf16: bool = True, callback: Callable | None = None,
          should_stop: Callable[[], bool] | None = None, loss_fn: Callable | None = None,
          after_step: Callable[[int], None] | None = None) -> TrainResult:
    """`steps` optimizer steps over the parameters that require gradients, each from `accumulation`
    micro-batches drawn from `batches` (dicts of input_ids, labels and optionally attention_mask).

    Held-out loss is measured before the first step, every `eval_every` steps and after the last one.
    `loss_fn(model, batch, device, bf16)` replaces the next-token cross-entropy as the training loss (held-out
    loss stays the cross-entropy); `after_step(step)` runs after each update, before that step's event.
    `should_stop()` is checked before every step; a stop raises JobCancelled (the caller decides what
    to keep)."""
    emit = callback or _ignore
    loss_fn = loss_fn or batch_loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    scheduler = make_scheduler(optimizer, optim, steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = TrainResult()

    def evaluate(step: int) -> float | None:
        if not heldout:
            return None
        h = HeldoutLoss(step, heldout_loss(model, heldout, device, bf16))
        result.heldout.append(h)
        emit(h)
        return h.loss

    evaluate(0)
    model.train()
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            raise JobCancelled("training was cancelled")
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        losses, loss_tokens, input_tokens = [], 0, 0
        for _ in range(accumulation):
            batch = next(batches)
            loss = loss_fn(model, batch, device, bf16)
            (loss / accumulation).backward()
            losses.append(float(loss.detach()))
            loss_tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
            input_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()  # gradients set to None: freed until the next backward
        seconds = time.perf_counter() - t0
        result.tokens_seen += input_tokens
        held = evaluate(step) if (eval_every and step % eval_every == 0) or step == steps else None
        if after_step is not None:
            after_step(step)
        model.train()
        elapsed = time.perf_counter() - t_start
        event = TrainStep(step, steps, sum(losses) / len(losses), held, lr, loss_tokens,
                          input_tokens / max(seconds, 1e-9), elapsed, elapsed / step * (steps - step))
        result.steps.append(event)
        emit(event)
    model.eval()
    result.seconds = time.perf_counter() - t_start
    result.peak_memory_mb = peak_memory_mb(device)
    return result


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
