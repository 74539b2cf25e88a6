"""The shear driver: learn masks (and weights) under the Lagrangian, then cut to the target (SPEC §9).

Two minimisers (weights at 1e-4, log α at 1.0) and one maximiser (λ at 1.0, gradient ascent), AdamW β (0.9, 0.95)
without weight decay, cosine with 10% warm-up for all three, gradients clipped at 1.0; the target sparsity rises
linearly from 0 over the first fifth of the steps."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from slimgpt_core.base.cache import forget_fingerprint
from slimgpt_core.base.devices import peak_memory_mb, resolve_device
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.events import RunReport
from slimgpt_core.base.shapes import count_parameters, head_dim
from slimgpt_core.methods.shear.apply import MaskedModel
from slimgpt_core.methods.shear.cut import cut_model
from slimgpt_core.methods.shear.masks import ShearMasks
from slimgpt_core.methods.shear.settings import ShearSettings
from slimgpt_core.methods.shear.target import Shape, source_shape


@dataclass
class ShearStep:
    """One optimisation step: losses, each structure's expected size against its target, the multipliers."""
    step: int
    steps: int
    loss: float  # language-model loss (nats/token) under the sampled masks
    lagrangian: float
    expected: dict[str, float]  # expected whole-model counts (means over layers)
    target: dict[str, float]  # the target counts at this step (rising from the source's)
    lambdas: dict[str, list[float]]
    expected_parameters: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    kind: str = "shear"


@dataclass
class ShearResult:
    report: RunReport
    source: Shape
    target: Shape
    kept_layers: list[int]
    history: list[ShearStep] = field(default_factory=list)


def lr_factor(step: int, steps: int, warmup: float) -> float:
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _target_now(masks: ShearMasks, warm: float) -> dict[str, float]:
    s, t = masks.source, masks.target
    out = {}
    for key in ("layers", "kv_groups", "heads_per_group", "ffn", "hidden"):
        src = getattr(s, key)
        out[key] = src - warm * (src - getattr(t, key))
    out["heads"] = out["kv_groups"] * out["heads_per_group"]
    return out


def _optimizers(model, masks: ShearMasks, settings: ShearSettings) -> tuple[list, list, list]:
    """(the weights trained, the optimizers: λ's ascent then the masks' and weights' descent, the descent's
    schedulers). Without train_weights the model's parameters stop asking for gradients."""
    weights = [p for p in model.parameters() if p.requires_grad] if settings.train_weights else []
    if not settings.train_weights:
        model.requires_grad_(False)
    betas = (0.9, 0.95)
    ascent = torch.optim.AdamW(masks.lambda_parameters(), lr=settings.lambda_lr, betas=betas, weight_decay=0.0,
                               maximize=True)
    descent = [torch.optim.AdamW(masks.mask_parameters(), lr=settings.mask_lr, betas=betas, weight_decay=0.0)]
    if weights:
        descent.append(torch.optim.AdamW(weights, lr=settings.lr, betas=betas, weight_decay=0.0))
    # weights and masks: warm-up then cosine; λ keeps its rate, so the constraint is still enforced at the end
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, settings.steps, settings.warmup))
                  for o in descent]
    return weights, [ascent, *descent], schedulers


def _learn_masks(model, masks: ShearMasks, tokens: torch.Tensor, settings: ShearSettings, device: torch.device,
                 callback: Callable[[ShearStep], None] | None, should_stop: Callable[[], bool] | None):
    """The training steps of the masks (and weights): micro-batches in a seeded order, one gate sample a step.
    Returns (the steps' events, tokens seen, the deterministic gates, the time the steps started)."""
    weights, optimizers, schedulers = _optimizers(model, masks, settings)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(settings.seed))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    history: list[ShearStep] = []
    t0 = time.perf_counter()
    seen = 0
    model.train()
    with MaskedModel(model) as masked:
        for step in range(settings.steps):
            if should_stop is not None and should_stop():
                raise JobCancelled("shear was cancelled")
            pick = [order[(step * settings.batch_size + j) % len(order)] for j in range(settings.batch_size)]
            ids = tokens[torch.stack(pick)].to(device)
            warm = min(1.0, step / max(1.0, settings.target_warmup * settings.steps))
            masked.gates = masks.sample()
            with autocast:
                lm_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            penalty, _ = masks.lagrangian(warm)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            (lm_loss.float() + penalty).backward()
            torch.nn.utils.clip_grad_norm_(weights + masks.mask_parameters(), settings.clip)
            for o in optimizers:
                o.step()
            for s in schedulers:
                s.step()
            masks.clamp_()
            seen += ids.numel()
            history.append(_step_event(masks, step, settings.steps, lm_loss, penalty, warm, seen, t0))
            if callback is not None:
                callback(history[-1])
        model.eval()
        gates = masks.deterministic()
    return history, seen, gates, t0


def _step_event(masks: ShearMasks, step: int, steps: int, lm_loss: torch.Tensor, penalty: torch.Tensor, warm: float,
                seen: int, t0: float) -> ShearStep:
    elapsed = time.perf_counter() - t0
    return ShearStep(step + 1, steps, float(lm_loss.detach()), float(penalty.detach()), masks.expected_shape(),
                     _target_now(masks, warm),
                     {k: [float(v) for v in lam.detach()] for k, lam in masks.lambdas.items()},
                     masks.expected_parameters(), seen / elapsed, elapsed, elapsed / (step + 1) * (steps - step - 1))


def shear_model(model, tokens: torch.Tensor, target: Shape, settings: ShearSettings,
                callback: Callable[[ShearStep], None] | None = None, should_stop: Callable[[], bool] | None = None,
                model_name: str = "") -> ShearResult:
    """Learn masks on `tokens` [N, seqlen] (micro-batches drawn in a seeded order), then cut `model` in place to
    exactly `target`. The model is trained in place too (unless settings.train_weights is False)."""

    if settings.steps < 1 or settings.batch_size < 1:
        raise SlimGPTError(f"need steps >= 1 and batch size >= 1, got {settings.steps} and {settings.batch_size}")
    device = resolve_device(settings.device)
    source = source_shape(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    params_before, layer_params_before = count_parameters(model), count_parameters(model.model.layers)
    torch.manual_seed(settings.seed)
    masks = ShearMasks(source, target, head_dim(model.config), model.config.vocab_size, tied)
    model.to(device)
    masks.to(device)
    history, seen, gates, t0 = _learn_masks(model, masks, tokens, settings, device, callback, should_stop)
    model.requires_grad_(True)
    kept_layers = (torch.nonzero(gates["layers"] != 0).flatten().tolist() if "layers" in gates
                   else list(range(source.layers)))
    cut_model(model, gates)
    model.to("cpu")
    forget_fingerprint(model)  # weights changed in place: cached results keyed on the old ones no longer apply
    total = time.perf_counter() - t0
    learned = source_shape(model)
    if learned != target:
        raise SlimGPTError(f"internal error: the cut gave {learned}, not the target {target}")  # never expected
    report = RunReport(
        model_name, {"method": "shear", "source_model": model_name, "target": target.to_dict(),
                     "source_shape": source.to_dict(), "kept_layers": kept_layers, **asdict(settings),
                     "tokens_seen": seen},
        [1 - target.heads / source.heads] * target.layers, [1 - target.ffn / source.ffn] * target.layers,
        params_before, count_parameters(model), layer_params_before, count_parameters(model.model.layers),
        total_seconds=total, peak_memory_mb=peak_memory_mb(device), device=str(device),
        phase_seconds={"masks": history[-1].elapsed_s, "cut": total - history[-1].elapsed_s})
    model.config.slimgpt = {"source_model": model_name, "method": "shear", "target": target.to_dict()}
    return ShearResult(report, source, target, kept_layers, history)
