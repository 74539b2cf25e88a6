"""The variant database and the stitched forward behind `auto` (SPEC §10); refine.py searches with them.

- Variants: every layer's o_proj and down_proj pruned on the *dense* model's inputs at a level (the first k units
  of the error curves' greedy removal order, curves.py), one group-OBS update of those units; made on demand and
  kept in a small LRU. Removed units are zeroed columns, so any combination of variants runs stitched.
- Stitched forward: the dense model with variants swapped in, recomputed from a candidate's first changed layer;
  its fitness is KL(dense ‖ candidate) of next-token distributions per token on calibration tokens (never
  evaluation text), the dense log-probabilities cached.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.shapes import attention_unit_columns, unit_parameters
from slimgpt_core.methods import obs
from slimgpt_core.methods.forwards import capture_layer_inputs, run_layer
from slimgpt_core.methods.statistics import dense_hessians
from slimgpt_core.schedules.curves import ModelCurves


def unit_costs(model) -> tuple[list[int], list[int]]:
    """Parameters one KV group (its query heads, K, V and o_proj columns) and one FFN channel remove, per layer."""
    units = [unit_parameters(layer) for layer in model.model.layers]
    return [u.per_kv_group for u in units], [u.per_channel for u in units]


class VariantDatabase:
    """Dense-input OBS variants of every o_proj and down_proj, made on demand from the curves' removal orders."""

    def __init__(self, model, curves: ModelCurves, tokens: torch.Tensor, damp: float = 0.01, batch_size: int = 8,
                 device: str = "auto", should_stop: Callable[[], bool] | None = None, max_cached: int = 512,
                 progress: Callable[[int, int], None] | None = None, what: str = "statistics"):
        self.curves = curves
        # per layer: (o_proj's W, its damped H⁻¹, down_proj's W, its damped H⁻¹), dead inputs' columns zeroed
        self.inverse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        n = len(model.model.layers)
        for i, layer, H_attn, H_mlp in dense_hessians(model, tokens, batch_size, device, should_stop, what):
            Wo, Hi_o, _ = obs.damped_inverse(layer.self_attn.o_proj.weight.data.float(), H_attn, damp)
            Wd, Hi_d, _ = obs.damped_inverse(layer.mlp.down_proj.weight.data.float(), H_mlp, damp)
            self.inverse.append((Wo.cpu(), Hi_o.cpu(), Wd.cpu(), Hi_d.cpu()))
            if progress is not None:
                progress(i + 1, n)
        self.group = [attention_unit_columns(layer) for layer in model.model.layers]
        self.cached: OrderedDict = OrderedDict()
        self.max_cached = max_cached

    def attention(self, layer: int, kv_removed: int) -> torch.Tensor:
        return self._variant(layer, "attn", kv_removed)

    def ffn(self, layer: int, channels: int) -> torch.Tensor:
        return self._variant(layer, "mlp", channels)

    def dense(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, damped H⁻¹) of this layer's o_proj ("attn") or down_proj ("mlp")."""
        Wo, Hi_o, Wd, Hi_d = self.inverse[layer]
        return (Wo, Hi_o) if module == "attn" else (Wd, Hi_d)

    def columns(self, layer: int, module: str, count: int) -> torch.Tensor:
        """The input columns a variant removes: the first `count` units of the curves' greedy order."""
        lc = self.curves.layers[layer]
        if module == "attn":
            g = self.group[layer]
            return torch.tensor([u * g + j for u in lc.head_order[:count] for j in range(g)], dtype=torch.long)
        return torch.tensor(sorted(lc.ffn_order[:count]), dtype=torch.long)

    def _variant(self, layer: int, module: str, count: int) -> torch.Tensor:
        key = (layer, module, count)
        if key in self.cached:
            self.cached.move_to_end(key)
            return self.cached[key]
        W = self._make(layer, module, count)
        self.cached[key] = W
        if len(self.cached) > self.max_cached:
            del self.cached[next(iter(self.cached))]  # the least recently used
        return W

    def _make(self, layer: int, module: str, count: int) -> torch.Tensor:
        """A variant not in the in-memory cache."""
        return obs.removed_weights(*self.dense(layer, module), self.columns(layer, module, count))


class StitchedModel:
    """The dense model run with database variants swapped into o_proj / down_proj; KL against the dense model."""

    def __init__(self, model, db: VariantDatabase, tokens: torch.Tensor, batch_size: int = 8, device: str = "auto",
                 dense_logp: list[torch.Tensor] | None = None):
        """`dense_logp`: the dense model's log-probabilities of `tokens` in batches of `batch_size`, when a forward
        already made them (global_allocation.output_fisher); otherwise one stitched forward without variants. When
        it covers only the first batches (the Fisher's windows of a larger pool), the others are made when a KL
        first needs them."""
        self.model, self.db, self.bs = model, db, batch_size
        self.dev = resolve_device(device)
        model.to(self.dev)
        self.x0, self.kwargs = capture_layer_inputs(model, tokens, batch_size, self.dev)
        self.n = len(model.model.layers)
        sizes = [b.shape[0] for b in self._batches(tokens)]
        if dense_logp is None:
            dense_kv, dense_ch = [0] * self.n, [0] * self.n
            dense_logp = [self._logp(h) for h in self._batches(self.run(dense_kv, dense_ch)[-1])]
        elif [p.shape[0] for p in dense_logp] != sizes[:len(dense_logp)] or len(dense_logp) > len(sizes):
            raise ValueError("dense_logp is not in batches of batch_size over these tokens")
        self.dense_logp = dense_logp

    def _dense(self, batch: int) -> torch.Tensor:
        """The dense log-probabilities of one batch of the tokens, made (with every batch before it) if missing."""
        while len(self.dense_logp) <= batch:
            s = len(self.dense_logp) * self.bs
            dense = self.run([0] * self.n, [0] * self.n, 0, self.x0[s:s + self.bs])[-1]
            self.dense_logp.append(self._logp(dense))
        return self.dense_logp[batch]

    def _batches(self, x: torch.Tensor):
        return [x[s:s + self.bs] for s in range(0, x.shape[0], self.bs)]

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.model.lm_head(self.model.model.norm(h)).float(), dim=-1)

    def run(self, kv: Sequence[int], ch: Sequence[int], start: int = 0, x: torch.Tensor | None = None,
            inputs: list | None = None) -> list[torch.Tensor]:
        """Hidden states entering layers start … n (the last is the final one) for this schedule."""

        x = self.x0 if x is None else x
        states = [x]
        layers = self.model.model.layers
        for i in range(start, self.n):
            o, d = layers[i].self_attn.o_proj, layers[i].mlp.down_proj
            saved = o.weight.data, d.weight.data
            try:
                if kv[i]:
                    o.weight.data = self.db.attention(i, kv[i]).to(o.weight.device, o.weight.dtype)
                if ch[i]:
                    d.weight.data = self.db.ffn(i, ch[i]).to(d.weight.device, d.weight.dtype)
                x = run_layer(layers[i], x, self.kwargs.layer(i), self.bs)
            finally:
                o.weight.data, d.weight.data = saved
            states.append(x)
        return states

    def window_kl(self, final: torch.Tensor, samples: Sequence[int]) -> torch.Tensor:
        """KL(dense ‖ candidate) per token, averaged over each of these calibration sequences (final: their hidden
        states), as one float64 value per sequence: a search keeps them to compare on any subset of windows."""
        rows = []
        for s in range(0, len(samples), self.bs):
            idx = list(samples[s:s + self.bs])
            dense = torch.cat([self._dense(i // self.bs)[i % self.bs:i % self.bs + 1] for i in idx])
            cand = self._logp(final[s:s + self.bs])
            rows.append((dense.exp() * (dense - cand)).sum(dim=(1, 2)).double() / dense.shape[1])
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64)

    def kl(self, final: torch.Tensor, samples: Sequence[int]) -> float:
        """Mean KL(dense ‖ candidate) per token over these calibration sequences (of equal length)."""
        return float(self.window_kl(final, samples).mean())
