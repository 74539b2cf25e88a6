"""Minitron's activation-based importance (Muralidharan et al., 2024; SPEC §9), one shot, no weight update.

Forward only, on calibration text: a head by the input of o_proj, an FFN channel by the input of down_proj, a
hidden channel by every pre-attention and pre-MLP norm output (summed over layers); each as |x| averaged over
the sequence, then L2 over the batch (heads: then L2 over the head's channels). A layer by 1 − cos(its input,
its output), averaged over tokens. Two ways to use it: to a target shape (heads ranked within their KV group,
plus hidden size and depth), and at a pruning ratio through the pipeline (`--method minitron`, KV groups and
channels at the same per-layer counts as every other method, so the comparison grid is at equal parameters)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from slimgpt_core.base.cache import forget_fingerprint
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.base.events import Progress, RunReport
from slimgpt_core.base.shapes import count_parameters, keep_channels, keep_kv_groups, layer_shape, update_config
from slimgpt_core.methods.prune_settings import plan_removals
from slimgpt_core.methods.shear.cut import cut_model
from slimgpt_core.methods.shear.target import source_shape
from slimgpt_core.methods.shear.train import ShearResult


@dataclass
class MinitronScores:
    heads: torch.Tensor  # [L, query heads]
    ffn: torch.Tensor  # [L, channels]
    hidden: torch.Tensor  # [hidden]
    layers: torch.Tensor  # [L] 1 − mean cos(input, output)


def _ignore(event) -> None:
    """The listener of a run given no callback: events are dropped."""


def _seq_mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().abs().mean(1)  # [batch, channels]


@torch.no_grad()
def collect_scores(model, tokens: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu",
                   should_stop: Callable[[], bool] | None = None) -> MinitronScores:
    layers = model.model.layers
    L, d = len(layers), model.config.hidden_size
    head_sq = [0.0] * L  # Σ_batch (seq-mean |x|)², per input channel of o_proj
    ffn_sq = [0.0] * L
    hidden_sq = [0.0] * (2 * L)  # per norm
    cos_sum, n_tokens = torch.zeros(L), 0
    handles = []

    def accumulate(store, idx):
        def hook(module, args):
            store[idx] = store[idx] + _seq_mean_abs(args[0]).pow(2).sum(0)
        return hook

    def norm_hook(idx):
        def hook(module, args, out):
            hidden_sq[idx] = hidden_sq[idx] + _seq_mean_abs(out).pow(2).sum(0)
        return hook

    # a layer's input and output are the residual stream entering its input norm and the next one (the final norm
    # after the last layer): read there, whatever a layer's call signature or return type, one tensor held at a time
    entering = {}

    def stream_hook(idx):
        def hook(module, args):
            x = args[0].float()
            if idx:
                cos_sum[idx - 1] += F.cosine_similarity(entering.pop("x"), x, dim=-1).sum().cpu()
            entering["x"] = x
        return hook

    for i, layer in enumerate(layers):
        handles += [layer.self_attn.o_proj.register_forward_pre_hook(accumulate(head_sq, i)),
                    layer.mlp.down_proj.register_forward_pre_hook(accumulate(ffn_sq, i)),
                    layer.input_layernorm.register_forward_hook(norm_hook(2 * i)),
                    layer.post_attention_layernorm.register_forward_hook(norm_hook(2 * i + 1)),
                    layer.input_layernorm.register_forward_pre_hook(stream_hook(i))]
    handles.append(model.model.norm.register_forward_pre_hook(stream_hook(L)))
    model.to(device)
    try:
        for s in range(0, len(tokens), batch_size):
            if should_stop is not None and should_stop():
                raise JobCancelled()
            ids = tokens[s:s + batch_size].to(device)
            model(input_ids=ids, use_cache=False)
            n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    heads = []
    for i, layer in enumerate(layers):
        hd = layer.self_attn.head_dim
        heads.append(head_sq[i].sqrt().view(-1, hd).norm(dim=1).cpu())
    return MinitronScores(torch.stack(heads), torch.stack([f.sqrt().cpu() for f in ffn_sq]),
                          sum(h.sqrt() for h in hidden_sq).cpu().reshape(d), 1 - cos_sum / n_tokens)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 on the k largest entries of each row, 0 elsewhere."""
    gate = torch.zeros_like(scores)
    gate.scatter_(-1, scores.topk(k).indices, 1.0)
    return gate


def shape_gates(model, scores: MinitronScores, target) -> dict[str, torch.Tensor]:
    """Binary gates to a target shape (shear.target.Shape) for shear.cut.cut_model: query heads ranked within
    their KV group (each group keeps the same count), groups by the L2 of their heads, channels, hidden, layers."""

    src = source_shape(model)
    rep = src.heads_per_group
    per_group = scores.heads.view(src.layers, src.kv_groups, rep)
    gates = {}
    if target.layers < src.layers:
        gates["layers"] = _top(scores.layers, target.layers)
    if target.kv_groups < src.kv_groups:
        gates["kv_groups"] = _top(per_group.norm(dim=-1), target.kv_groups)
    if target.heads_per_group < rep:
        gates["heads"] = _top(per_group, target.heads_per_group)  # [L, groups, per group]
    if target.ffn < src.ffn:
        gates["ffn"] = _top(scores.ffn, target.ffn)
    if target.hidden < src.hidden:
        gates["hidden"] = _top(scores.hidden, target.hidden)
    return gates


def prune_to_shape(model, tokens: torch.Tensor, target, batch_size: int = 8, device="cpu",
                   should_stop: Callable[[], bool] | None = None) -> MinitronScores:
    """One-shot Minitron to a target shape, in place."""
    scores = collect_scores(model, tokens, batch_size, device, should_stop)
    model.to("cpu")
    prune_to_shape_from_scores(model, scores, target)
    model.config.slimgpt = {"method": "minitron", "target": target.to_dict()}
    return scores


def prune_minitron(model, tokens: torch.Tensor, settings, callback=None, should_stop=None,
                   model_name: str = "") -> RunReport:
    """The pipeline's `--method minitron`: the same per-layer counts of KV groups and FFN channels as every
    method (prune_settings.plan_removals), chosen by activation importance; a KV group scores as the L2 of its heads."""

    emit = callback or _ignore
    device = resolve_device(settings.device)
    head_r, ffn_r, head_rm, ffn_rm = plan_removals(model, settings)
    layers = model.model.layers
    params_before, layer_params_before = count_parameters(model), count_parameters(layers)
    t0 = time.perf_counter()
    emit(Progress(0, len(layers), "capture", 0.0))
    scores = collect_scores(model, tokens, settings.batch_size, device, should_stop)
    model.to("cpu")
    t_scores = time.perf_counter() - t0
    for i, layer in enumerate(layers):
        if should_stop is not None and should_stop():
            raise JobCancelled()
        q, kv, f = layer_shape(layer)
        group_scores = scores.heads[i].view(kv, q // kv).norm(dim=1)
        keep_kv_groups(layer, sorted(group_scores.topk(kv - head_rm[i]).indices.tolist()))
        keep_channels(layer, sorted(scores.ffn[i].topk(f - ffn_rm[i]).indices.tolist()))
        emit(Progress(i, len(layers), "outputs", time.perf_counter() - t0))
    update_config(model)
    forget_fingerprint(model)
    total = time.perf_counter() - t0
    report = RunReport(model_name, settings.record(), head_r, ffn_r, params_before, count_parameters(model),
                         layer_params_before, count_parameters(layers), phase_seconds={
                             "scores": t_scores, "cut": total - t_scores}, total_seconds=total, device=str(device))
    model.config.slimgpt = {"source_model": model_name, **settings.record()}
    emit(Progress(len(layers) - 1, len(layers), "done", report.total_seconds))
    return report


def shape_run(model, tokens: torch.Tensor, target, batch_size: int = 8, device="cpu", model_name: str = "",
              should_stop: Callable[[], bool] | None = None):
    """`shear --method minitron`: one-shot Minitron to a target shape, as a run (a ShearResult with no steps)."""

    source = source_shape(model)
    params_before, layer_params_before = count_parameters(model), count_parameters(model.model.layers)
    t0 = time.perf_counter()
    scores = collect_scores(model, tokens, batch_size, device, should_stop)
    model.to("cpu")
    kept = sorted(scores.layers.topk(target.layers).indices.tolist())
    prune_to_shape_from_scores(model, scores, target)
    report = RunReport(
        model_name, {"method": "minitron", "source_model": model_name, "target": target.to_dict(),
                     "source_shape": source.to_dict(), "kept_layers": kept, "calibration_tokens": tokens.numel()},
        [1 - target.heads / source.heads] * target.layers, [1 - target.ffn / source.ffn] * target.layers,
        params_before, count_parameters(model), layer_params_before, count_parameters(model.model.layers),
        total_seconds=time.perf_counter() - t0, device=str(device))
    model.config.slimgpt = {"source_model": model_name, "method": "minitron", "target": target.to_dict()}
    return ShearResult(report, source, target, kept)


def prune_to_shape_from_scores(model, scores: MinitronScores, target) -> None:
    cut_model(model, shape_gates(model, scores, target))
    forget_fingerprint(model)
