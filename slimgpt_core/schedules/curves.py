"""Per-layer OBS-predicted error curves on dense inputs (SPEC §7), the what-if prediction, the sensitivity map.

A curve says how much relative reconstruction error a module takes as units are removed, compensated by OBS:
- heads: E_h(k) for k = 0 … n−1 attention units (`shapes.head_units`: KV groups, or the query heads of a layer
  with one KV head, as the pruner removes them), each value exactly what `obs.prune_head_groups` reports for k;
- FFN: one greedy pass with small fixed groups (about 1/128 of the width), recording the running sum of the
  group errors. `obs.prune_channels` (dynamic groups, what the pipeline runs) removes larger first groups,
  so its error is a little higher at the same count: `ffn_curve_gap` measures how far (tests assert the
  bound stated in `FFN_CURVE_TOLERANCE`).
Errors are relative to the module's own output, tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), as the report's predicted errors.
Curves are computed once from the dense statistics and cached (cache/stats) next to them; `predict` and
`sensitivity_map` then need no forward pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy
import torch

from slimgpt_core import data
from slimgpt_core.base import cache
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.events import Progress
from slimgpt_core.base.shapes import attention_unit_columns, head_units, layer_shape
from slimgpt_core.methods import obs
from slimgpt_core.methods.prune_settings import ffn_units_removed
from slimgpt_core.methods.statistics import dense_hessians
from slimgpt_core.schedules.schedule import units_to_remove

CURVES_VERSION = "curves-v3"  # v3: one-KV-head layers by query head (v2: upper-triangular statistics, stats-v3)
MAP_RATIOS = tuple(round(0.05 * i, 2) for i in range(19))  # 0 … 0.9
# measured (bench/whatif_bench.py, stories260k and SmolLM2, 2.5% grid of the width up to 95%): the fixed-group
# greedy curve lies below prune_channels' dynamic groups by at most this fraction of prune_channels' error
FFN_CURVE_TOLERANCE = 0.25


# --- pure tensor functions ---------------------------------------------------------------------------------

def head_curve(W: torch.Tensor, H: torch.Tensor, group: int, damp: float = 0.01) -> tuple[list[float], list[int]]:
    """(E(k) for k = 0 … n_units−1 in absolute units, the greedy removal order). Greedy is deterministic, so
    removing k units is the first k steps of removing n_units−1."""
    passes = [obs.prune_head_groups(W, H, group, k, damp) for k in range(1, W.shape[1] // group)]
    return [0.0] + [p.predicted_error for p in passes], passes[-1].removed if passes else []


def ffn_curve(W: torch.Tensor, H: torch.Tensor, step: int, damp: float = 0.01) -> tuple[list[int], list[float],
                                                                                       list[int]]:
    """Greedy OBS removal of input columns `step` at a time down to one column.

    Returns (removed counts 0, step, …, n−1; cumulative error at each; removal order). Each step scores
    the alive columns, removes the `step` cheapest and downdates H⁻¹: the same update as obs.prune_channels
    with every group of size `step`. The update of a live entry of W or H⁻¹ reads live entries only, so the
    removed columns are masked out of the scores and left as they are (at rounding noise): once an eighth of the columns is dead the matrices are compacted, and
    the later steps (most of a pass that removes nearly everything) touch a shrinking H⁻¹ (4× faster on
    SmolLM2, identical results)."""
    W, Hinv, _ = obs.damped_inverse(W.float(), H, damp)
    n = W.shape[1]
    column = torch.arange(n, device=W.device)  # original index of each column still held
    dead = torch.zeros(n, dtype=torch.bool, device=W.device)  # removed since the last compaction
    counts, errors, order, total = [0], [0.0], [], 0.0
    for done in range(0, n - 1, step):  # done == len(order)
        cnt = min(step, n - 1 - done)
        scores = W.pow(2).sum(0) / torch.diag(Hinv)  # live columns: H⁻¹'s diagonal is positive
        scores[dead] = torch.inf
        cols = torch.topk(scores, cnt, largest=False).indices.sort().values
        total += obs.remove_and_measure(W, Hinv, cols)
        dead[cols] = True
        order.extend(column[cols].tolist())
        counts.append(len(order))
        errors.append(total)
        if 8 * int(dead.sum()) >= len(dead):
            live = (~dead).nonzero().flatten()
            W, Hinv, column = W[:, live].contiguous(), Hinv[live][:, live].contiguous(), column[live]
            dead = torch.zeros(len(live), dtype=torch.bool, device=W.device)
    return counts, errors, order


def interpolate(counts: Sequence[int], values: Sequence[float], c: float) -> float:
    """Piecewise-linear value at c (counts ascending)."""
    return float(numpy.interp(c, counts, values))  # flat beyond the ends


# --- curves of a model -------------------------------------------------------------------------------------

@dataclass
class LayerCurves:
    n_kv: int  # attention units of the head curve (`shapes.head_units`: KV groups, or query heads of one KV head)
    heads_per_unit: int
    n_ffn: int
    head_errors: list[float]  # relative error after removing k = 0 … n_kv−1 units
    head_order: list[int]  # greedy unit removal order
    ffn_counts: list[int]  # channels removed at each curve point
    ffn_errors: list[float]  # relative error at each point
    ffn_order: list[int]  # greedy channel removal order
    attn_energy: float  # tr(W H Wᵀ) of o_proj: the denominator of the relative errors
    mlp_energy: float

    def head_error(self, k: int) -> float:
        return self.head_errors[max(0, min(k, len(self.head_errors) - 1))]

    def ffn_error(self, c: float) -> float:
        return interpolate(self.ffn_counts, self.ffn_errors, c)


@dataclass
class ModelCurves:
    layers: list[LayerCurves]
    seconds: float = 0.0  # time to compute them (0 when read from the cache)
    from_cache: bool = False

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, lc in enumerate(self.layers):
            out[f"{i}.meta"] = torch.tensor([lc.n_kv, lc.heads_per_unit, lc.n_ffn])
            out[f"{i}.head_errors"] = torch.tensor(lc.head_errors, dtype=torch.float64)
            out[f"{i}.head_order"] = torch.tensor(lc.head_order)  # int64 (a Python int list)
            out[f"{i}.ffn_counts"] = torch.tensor(lc.ffn_counts)
            out[f"{i}.ffn_errors"] = torch.tensor(lc.ffn_errors, dtype=torch.float64)
            out[f"{i}.ffn_order"] = torch.tensor(lc.ffn_order)
            out[f"{i}.energy"] = torch.tensor([lc.attn_energy, lc.mlp_energy], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "ModelCurves":
        layers = []
        for i in range(sum(k.endswith(".meta") for k in t)):
            n_kv, per, n_ffn = (int(v) for v in t[f"{i}.meta"])
            energy = t[f"{i}.energy"].tolist()
            layers.append(LayerCurves(n_kv, per, n_ffn, t[f"{i}.head_errors"].tolist(), t[f"{i}.head_order"].tolist(),
                                      t[f"{i}.ffn_counts"].tolist(), t[f"{i}.ffn_errors"].tolist(),
                                      t[f"{i}.ffn_order"].tolist(), energy[0], energy[1]))
        return cls(layers, 0.0, True)


def ffn_step(n_channels: int) -> int:
    return max(1, n_channels // 128)


def layer_curves(layer, H_attn: torch.Tensor, H_mlp: torch.Tensor, damp: float = 0.01) -> LayerCurves:
    attn, mlp = layer.self_attn, layer.mlp
    q, kv, _ = layer_shape(layer)
    per_unit = head_units(q, kv)[1]
    group = attention_unit_columns(layer)
    Wo = attn.o_proj.weight.data.float()
    Wd = mlp.down_proj.weight.data.float()
    e_attn, e_mlp = obs.quadratic_error(Wo, H_attn), obs.quadratic_error(Wd, H_mlp)
    head_abs, head_order = head_curve(Wo, H_attn, group, damp)
    counts, ffn_abs, ffn_order = ffn_curve(Wd, H_mlp, ffn_step(Wd.shape[1]), damp)
    return LayerCurves(len(head_abs), per_unit, Wd.shape[1], [e / e_attn if e_attn else 0.0 for e in head_abs],
                       head_order, counts, [e / e_mlp if e_mlp else 0.0 for e in ffn_abs], ffn_order, e_attn, e_mlp)


def error_curves(model, tokens: torch.Tensor, damp: float = 0.01, batch_size: int = 8, device: str = "auto",
                 progress: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 use_cache: bool = True) -> ModelCurves:
    """Every layer's head and FFN curves on dense inputs (cached by model, calibration tokens and damping)."""


    key = f"{CURVES_VERSION}|{cache.model_fingerprint(model)}|{cache.tokens_digest(tokens)}|{damp}"
    if use_cache:
        found = cache.lookup_tensors("stats", key)
        if found is not None:
            return ModelCurves.from_tensors(found)
    t0 = time.perf_counter()
    layers = []
    n = len(model.model.layers)
    for i, layer, H_attn, H_mlp in dense_hessians(model, tokens, batch_size, device, should_stop, "error curves"):
        layers.append(layer_curves(layer, H_attn, H_mlp, damp))
        if progress is not None:
            progress(i + 1, n)
    curves = ModelCurves(layers, time.perf_counter() - t0)
    if use_cache:
        cache.store_tensors("stats", key, curves.to_tensors())
    return curves


# --- what-if -----------------------------------------------------------------------------------------------

@dataclass
class Prediction:
    """Predicted relative errors (dense inputs) of a schedule, per layer, and their sums."""
    attn: list[float]
    mlp: list[float]
    kv_removed: list[int]
    ffn_removed: list[int]

    @property
    def total_attn(self) -> float:
        return sum(self.attn)

    @property
    def total_mlp(self) -> float:
        return sum(self.mlp)

    @property
    def total(self) -> float:
        return self.total_attn + self.total_mlp


def removals(curves: ModelCurves, head_ratios: Sequence[float], ffn_ratios: Sequence[float],
             align: int | None = None) -> tuple[list[int], list[int]]:
    """KV groups and channels each layer loses at these ratios (the pipeline's rounding, ≥ 1 unit kept, FFN widths
    aligned as PruneSettings.align says)."""
    if len(head_ratios) != len(curves.layers) or len(ffn_ratios) != len(curves.layers):
        raise SlimGPTError(f"the schedule has {len(head_ratios)}/{len(ffn_ratios)} ratios but the model has "
                           f"{len(curves.layers)} layers")
    return ([units_to_remove(lc.n_kv, r) for lc, r in zip(curves.layers, head_ratios)],
            [ffn_units_removed(lc.n_ffn, r, align) for lc, r in zip(curves.layers, ffn_ratios)])


def predict(curves: ModelCurves, head_ratios: Sequence[float], ffn_ratios: Sequence[float],
            align: int | None = None) -> Prediction:
    """Per-layer predicted errors of a schedule from the curves alone (no forward pass)."""
    kv, ch = removals(curves, head_ratios, ffn_ratios, align)
    return Prediction([lc.head_error(k) for lc, k in zip(curves.layers, kv)],
                      [lc.ffn_error(c) for lc, c in zip(curves.layers, ch)], kv, ch)


@dataclass
class SensitivityMap:
    ratios: list[float]  # columns
    heads: list[list[float]]  # [layer][ratio] predicted relative error of attention
    ffn: list[list[float]]  # [layer][ratio] predicted relative error of the MLP


def sensitivity_map(curves: ModelCurves, ratios: Sequence[float] = MAP_RATIOS) -> SensitivityMap:
    heads = [[lc.head_error(units_to_remove(lc.n_kv, r)) for r in ratios] for lc in curves.layers]
    ffn = [[lc.ffn_error(units_to_remove(lc.n_ffn, r)) for r in ratios] for lc in curves.layers]
    return SensitivityMap(list(ratios), heads, ffn)


def ffn_curve_gap(W: torch.Tensor, H: torch.Tensor, counts: Sequence[int], damp: float = 0.01) -> list[float]:
    """(curve − prune_channels)/prune_channels at these channel counts: how far the fixed-group curve is from
    the dynamic-group pruning the pipeline runs."""
    c, e, _ = ffn_curve(W, H, ffn_step(W.shape[1]), damp)
    out = []
    for k in counts:
        ref = obs.prune_channels(W, H, k, damp).predicted_error
        out.append((interpolate(c, e, k) - ref) / ref if ref else 0.0)
    return out


def curves_job(loaded, calib: str, nsamples: int, seqlen: int, seed: int = 0, damp: float = 0.01,
               device: str = "auto", callback=None, should_stop=None) -> ModelCurves:
    """For the studio's job runner: calibration tokens, then the curves, with Progress events per layer."""


    t0 = time.perf_counter()
    tokens = data.calibration_tokens(loaded.tokenizer, calib, nsamples, seqlen, seed)

    def progress(done, total):
        if callback is not None:
            callback(Progress(done, total, "curves", time.perf_counter() - t0))
    return error_curves(loaded.model, tokens, damp, device=device, progress=progress, should_stop=should_stop)
