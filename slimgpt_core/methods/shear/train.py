"""The shear driver: learn masks (and weights) under the Lagrangian, then cut to the target (SPEC §9).

Two minimisers (weights at 1e-4, log α at 1.0) and one maximiser (λ at 1.0, gradient ascent), AdamW β (0.9, 0.95)
without weight decay, cosine with 10% warm-up for all three, gradients clipped at 1.0; the target sparsity rises
linearly from 0 over the first fifth of the steps.

Under torchrun (docs/distributed.md) the model is sharded with FSDP2 and every rank trains on its rows of each
micro-batch. The masks and multipliers are small (SmolLM2: ~47k numbers): every rank holds them whole, draws
the same gates from the same seeded generator, and averages the masks' gradients over the ranks, so every rank
takes the same mask step, as one process does (sharding them would save nothing and cost a gather per forward).
Checkpoints every K steps hold the model, masks, λ, the three optimizers, the schedulers, the gate generator and
the history; the data position is the step itself (micro-batches are drawn by index from a seeded order)."""
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
from slimgpt_core.training.checkpoints import CheckpointPlan, load_checkpoint, save_checkpoint
from slimgpt_core.training.distributed import (all_reduce_sums, average_gradients, check_batch_rows, clip_gradients,
                                               gathered_model, is_main, rank_rows, rank_world, shard_model)


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
    model: object = None  # the cut model (gathered from the ranks' shards under torchrun)
    log_alpha: dict[str, torch.Tensor] = field(default_factory=dict)  # the learned mask logits, per structure


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
    """(the weights trained, the optimizers: λ's ascent, the masks' descent, then the weights' descent when they
    train, the descent's schedulers). Without train_weights the model's parameters stop asking for gradients."""
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


@dataclass
class _Learning:
    """What mask learning carries from step to step (and what a checkpoint holds)."""
    net: torch.nn.Module  # the model, sharded under torchrun
    masks: ShearMasks
    tokens: torch.Tensor
    settings: ShearSettings
    device: torch.device
    weights: list
    optimizers: list
    schedulers: list
    order: torch.Tensor  # the seeded order micro-batches are drawn in, by index
    gates_rng: torch.Generator  # the gate draws: one generator, the same on every rank
    history: list[ShearStep] = field(default_factory=list)
    seen: int = 0  # input tokens of all ranks

    def parts(self):
        """(the weights' optimizer, {"masks": (the masks, their two optimizers)}) as checkpoints take them."""
        weights_optimizer = self.optimizers[2] if len(self.optimizers) > 2 else None
        return weights_optimizer, {"masks": (self.masks, self.optimizers[:2])}


def _micro_batches(run: _Learning, masked: MaskedModel, step: int) -> float:
    """Forward and backward over one step's micro-batches (this rank's rows of each), one gate draw each; the
    masks' gradients then averaged over the ranks (FSDP averages the weights'). Returns the step's mean loss."""
    s, world = run.settings, rank_world()[1]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    total = 0.0
    for a in range(s.grad_accumulation):
        first = (step * s.grad_accumulation + a) * s.batch_size
        pick = run.order[[(first + j) % len(run.order) for j in range(s.batch_size)]]
        ids = rank_rows({"input_ids": run.tokens[pick]})[0]["input_ids"].to(run.device)
        masked.gates = run.masks.sample(run.gates_rng)
        with autocast:
            lm_loss = run.net(input_ids=ids, labels=ids, use_cache=False).loss
        (lm_loss.float() / s.grad_accumulation).backward()  # every rank's rows hold as many tokens: mean of means
        total += float(lm_loss.detach())
    average_gradients(run.masks.mask_parameters())
    return sum(all_reduce_sums([total])) / (world * s.grad_accumulation)


def _step(run: _Learning, masked: MaskedModel, step: int) -> tuple[float, torch.Tensor, float]:
    """One optimisation step (0-based `step`): (language-model loss, the Lagrangian term, the target warm-up)."""
    s = run.settings
    for o in run.optimizers:
        o.zero_grad(set_to_none=True)
    loss = _micro_batches(run, masked, step)
    warm = min(1.0, step / max(1.0, s.target_warmup * s.steps))
    penalty, _ = run.masks.lagrangian(warm)  # the same on every rank: its gradients need no reduction
    penalty.backward()
    clip_gradients([run.weights, run.masks.mask_parameters()], s.clip)
    for o in run.optimizers:
        o.step()
    for sch in run.schedulers:
        sch.step()
    run.masks.clamp_()
    run.seen += s.batch_size * s.grad_accumulation * run.tokens.shape[1]
    return loss, penalty, warm


def _checkpoint(run: _Learning, step: int) -> None:
    plan = CheckpointPlan(run.settings.checkpoint_folder, run.settings.checkpoint_every)
    weights_optimizer, others = run.parts()
    state = {"history": [asdict(e) for e in run.history], "seen": run.seen,
             "schedulers": [sch.state_dict() for sch in run.schedulers]}
    save_checkpoint(plan, step, run.net, weights_optimizer, state, others, {"gates-rng": run.gates_rng.get_state()})


def _resume(run: _Learning) -> int:
    """The steps a resumed run has done (0: a fresh run); everything restored in place."""
    s = run.settings
    if not (s.checkpoint_folder and s.resume):
        return 0
    weights_optimizer, others = run.parts()
    rng = run.gates_rng.get_state()
    state = load_checkpoint(CheckpointPlan(s.checkpoint_folder, s.checkpoint_every, True), run.net,
                            weights_optimizer, others, {"gates-rng": rng})
    if state is None:
        return 0
    run.gates_rng.set_state(rng)
    for sch, saved in zip(run.schedulers, state["schedulers"]):
        sch.load_state_dict(saved)
    run.history = [ShearStep(**e) for e in state["history"]]
    run.seen = state["seen"]
    return state["step"]


def _learn_masks(run: _Learning, callback: Callable[[ShearStep], None] | None,
                 should_stop: Callable[[], bool] | None) -> tuple[dict[str, torch.Tensor], float]:
    """The training steps of the masks (and weights), from a checkpoint when resuming; a checkpoint every K
    steps. Returns (the deterministic gates, the time the steps started)."""
    s = run.settings
    done = _resume(run)
    t0, seen_before = time.perf_counter(), run.seen
    run.net.train()
    with MaskedModel(run.net) as masked:
        for step in range(done, s.steps):
            if should_stop is not None and should_stop():
                raise JobCancelled("shear was cancelled")
            loss, penalty, warm = _step(run, masked, step)
            run.history.append(_step_event(run, step, loss, penalty, warm, run.seen - seen_before, t0, done))
            if callback is not None:
                callback(run.history[-1])
            if s.checkpoint_folder and s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 \
                    and step + 1 < s.steps:
                _checkpoint(run, step + 1)
        run.net.eval()
        gates = run.masks.deterministic()
    return gates, t0


def _step_event(run: _Learning, step: int, loss: float, penalty: torch.Tensor, warm: float, seen: int, t0: float,
                done: int) -> ShearStep:
    """Step `step` (0-based) as an event; `seen` input tokens since this process started at step `done`."""
    masks, steps = run.masks, run.settings.steps
    elapsed = time.perf_counter() - t0
    return ShearStep(step + 1, steps, loss, float(penalty.detach()), masks.expected_shape(), _target_now(masks, warm),
                     {k: [float(v) for v in lam.detach()] for k, lam in masks.lambdas.items()},
                     masks.expected_parameters(), seen / elapsed, elapsed,
                     elapsed / (step + 1 - done) * (steps - step - 1))


def _learning(model, masks: ShearMasks, tokens: torch.Tensor, settings: ShearSettings,
              device: torch.device) -> _Learning:
    """The model sharded over the ranks (moved to `device` in one process), the masks beside it, the
    optimizers, the draw order and the gate generator, all seeded."""
    net = shard_model(model, device, bf16=True, activation_checkpointing=settings.activation_checkpointing)
    masks.to(device)
    weights, optimizers, schedulers = _optimizers(net, masks, settings)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(settings.seed))
    return _Learning(net, masks, tokens, settings, device, weights, optimizers, schedulers, order,
                     torch.Generator().manual_seed(settings.seed))


def _cut_on_rank0(run: _Learning, gates: dict[str, torch.Tensor]):
    """The trained model cut to the gates: in place in one process; under torchrun gathered once into a plain
    model on rank 0 and cut there (None on the other ranks)."""
    model = run.net
    if run.settings.activation_checkpointing:
        model.activation_checkpointing_disable()
    if rank_world()[1] > 1:
        model = gathered_model(run.net)
        if model is None:
            return None
        model.to(run.device)
    model.requires_grad_(True)
    cut_model(model, gates)
    model.to("cpu")
    forget_fingerprint(model)  # weights changed in place: cached results keyed on the old ones no longer apply
    return model


def shear_model(model, tokens: torch.Tensor, target: Shape, settings: ShearSettings,
                callback: Callable[[ShearStep], None] | None = None, should_stop: Callable[[], bool] | None = None,
                model_name: str = "") -> ShearResult | None:
    """Learn masks on `tokens` [N, seqlen] (micro-batches drawn in a seeded order), then cut `model` to exactly
    `target`. In one process the model is trained and cut in place (unless settings.train_weights is False);
    under torchrun every rank calls this (ranks other than 0 may pass a meta shell: training/distributed.py),
    rank 0 alone emits events and gets the result, with the cut model in `result.model` (None elsewhere)."""
    settings.validate()
    check_batch_rows(settings.batch_size)
    device = resolve_device(settings.device)
    source = source_shape(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    params_before, layer_params_before = count_parameters(model), count_parameters(model.model.layers)
    torch.manual_seed(settings.seed)
    masks = ShearMasks(source, target, head_dim(model.config), model.config.vocab_size, tied)
    run = _learning(model, masks, tokens, settings, device)
    gates, t0 = _learn_masks(run, callback if is_main() else None, should_stop)
    model = _cut_on_rank0(run, gates)
    if model is None:
        return None
    kept_layers = (torch.nonzero(gates["layers"] != 0).flatten().tolist() if "layers" in gates
                   else list(range(source.layers)))
    return _result(model, run, source, target, kept_layers, (params_before, layer_params_before), t0, model_name)


def _result(model, run: _Learning, source: Shape, target: Shape, kept_layers: list[int], before: tuple[int, int],
            t0: float, model_name: str) -> ShearResult:
    total = time.perf_counter() - t0
    learned = source_shape(model)
    if learned != target:
        raise SlimGPTError(f"internal error: the cut gave {learned}, not the target {target}")  # never expected
    history, settings, device = run.history, run.settings, run.device
    report = RunReport(
        model_name, {"method": "shear", "source_model": model_name, "target": target.to_dict(),
                     "source_shape": source.to_dict(), "kept_layers": kept_layers, **asdict(settings),
                     "tokens_seen": run.seen, "processes": rank_world()[1]},
        [1 - target.heads / source.heads] * target.layers, [1 - target.ffn / source.ffn] * target.layers,
        before[0], count_parameters(model), before[1], count_parameters(model.model.layers),
        total_seconds=total, peak_memory_mb=peak_memory_mb(device), device=str(device),
        phase_seconds={"masks": history[-1].elapsed_s, "cut": total - history[-1].elapsed_s})
    model.config.slimgpt = {"source_model": model_name, "method": "shear", "target": target.to_dict()}
    log_alpha = {k: v.detach().to("cpu").clone() for k, v in run.masks.log_alpha.items()}
    return ShearResult(report, source, target, kept_layers, history, model, log_alpha)
