"""Dense per-layer statistics: Hessians of o_proj's and down_proj's inputs on the dense model's inputs, cached
in cache/stats, and the first-step OBS scores the studio previews from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from slimgpt_core.base import cache
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import JobCancelled
from slimgpt_core.methods import obs
from slimgpt_core.methods.forwards import capture_layer_inputs, collect_layer_hessians, run_layer
from slimgpt_core.schedules.schedule import units_to_remove


MAX_CACHED_STATISTIC_BYTES = 256 * 2**20  # larger Hessians are recomputed rather than cached


class StatisticsCache:
    """Dense per-layer Hessians in cache/stats, keyed by model fingerprint, calibration tokens, layer, module."""

    def __init__(self, model, tokens: torch.Tensor, enabled: bool):
        self.enabled = enabled
        # v3: upper-triangular fp64 sums; bump when the way Hessians are accumulated changes. A disabled cache
        # has no prefix (and never fingerprints the model: seconds for a large one)
        self.prefix = f"stats-v3|{cache.model_fingerprint(model)}|{cache.tokens_digest(tokens)}" if enabled else None
        self.reused = 0

    def hessian(self, layer_idx: int, module: str, compute: Callable[[], torch.Tensor], dense: bool) -> torch.Tensor:
        if not (self.enabled and dense):
            return compute()
        key = f"{self.prefix}|{layer_idx}|{module}"
        found = cache.lookup_tensors("stats", key)
        if found is not None:
            self.reused += 1
            return found["H"]
        H = compute()
        if H.numel() * 4 <= MAX_CACHED_STATISTIC_BYTES:
            cache.store_tensors("stats", key, {"H": H})
        return H

    def lookup(self, layer_idx: int, module: str, dense: bool) -> torch.Tensor | None:
        if not (self.enabled and dense):
            return None
        found = cache.lookup_tensors("stats", f"{self.prefix}|{layer_idx}|{module}")
        if found is None:
            return None
        self.reused += 1
        return found["H"]

    def store(self, layer_idx: int, module: str, H: torch.Tensor, dense: bool) -> torch.Tensor:
        if self.enabled and dense and H.numel() * 4 <= MAX_CACHED_STATISTIC_BYTES:
            cache.store_tensors("stats", f"{self.prefix}|{layer_idx}|{module}", {"H": H})
        return H


@dataclass
class DenseStatistics:
    """First-step OBS scores of every head group and FFN channel of the dense model on dense inputs."""
    head_scores: list[list[float]]  # [layer][KV group]
    heads_per_unit: list[int]
    ffn_scores: list[list[float]]  # [layer][channel]

    def preview_removed(self, head_ratios: Sequence[float]) -> list[list[int]]:
        """The KV groups each layer would lose at these ratios, cheapest first (first-step ranking)."""
        out = []
        for scores, r in zip(self.head_scores, head_ratios):
            k = units_to_remove(len(scores), r)
            out.append(sorted(range(len(scores)), key=lambda u: scores[u])[:k])
        return out


def dense_hessians(model, tokens: torch.Tensor, batch_size: int = 8, device: str = "auto",
                   should_stop: Callable[[], bool] | None = None, what: str = "statistics"):
    """Yield (layer index, layer, H of o_proj, H of down_proj) on the dense model's inputs, layer by layer.

    Hessians come from the statistics cache when it holds them (the same entries `dense_statistics`
    writes), so a model whose statistics exist needs no forward pass here."""

    dev = resolve_device(device)
    stats = StatisticsCache(model, tokens, True)
    layers = model.model.layers
    x, kwargs, x_at = None, None, 0  # x: the dense inputs of layer x_at, once a layer has needed them
    for i, layer in enumerate(layers):
        if should_stop is not None and should_stop():
            raise JobCancelled(f"{what} were cancelled")
        home = next(layer.parameters()).device
        layer.to(dev)
        H_attn, H_mlp = stats.lookup(i, "attn", True), stats.lookup(i, "mlp", True)
        if H_attn is None or H_mlp is None:  # one pass gives both, and the next layer's inputs
            if x is None:
                x, kwargs = capture_layer_inputs(model, tokens, batch_size, dev)
            for j in range(x_at, i):  # catch up through earlier layers whose statistics were cached
                h = next(layers[j].parameters()).device
                x = run_layer(layers[j].to(dev), x, kwargs.layer(j), batch_size)
                layers[j].to(h)
            attn_H, mlp_H, x = collect_layer_hessians(layer, x, kwargs.layer(i), batch_size)
            x_at = i + 1
            H_attn = H_attn if H_attn is not None else stats.store(i, "attn", attn_H, True)
            H_mlp = H_mlp if H_mlp is not None else stats.store(i, "mlp", mlp_H, True)
        yield i, layer, H_attn.to(dev), H_mlp.to(dev)  # the caller must leave the layer dense
        layer.to(home)


def dense_statistics(model, tokens: torch.Tensor, damp: float = 0.01, batch_size: int = 8, device: str = "auto",
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> DenseStatistics:
    """One dense pass collecting every layer's Hessians (cached) and scoring heads and channels.

    With the cache warm this reads files only: the app previews head importance for any ratio at once."""
    n = len(model.model.layers)
    head_scores, per_unit, ffn_scores = [], [], []
    for i, layer, H_attn, H_mlp in dense_hessians(model, tokens, batch_size, device, should_stop):
        attn, mlp = layer.self_attn, layer.mlp
        rep = attn.num_key_value_groups
        res = obs.prune_head_groups(attn.o_proj.weight.data.float(), H_attn, attn.head_dim * rep, 0, damp)
        head_scores.append(res.first_scores)
        per_unit.append(rep)
        ffn_scores.append(obs.prune_channels(mlp.down_proj.weight.data.float(), H_mlp, 0, damp).first_scores)
        if progress is not None:
            progress(i + 1, n)
    return DenseStatistics(head_scores, per_unit, ffn_scores)
