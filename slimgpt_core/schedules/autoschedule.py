"""The `auto` schedule (SPEC §10): per-layer head and FFN removals for a parameter budget, found by a
budget-preserving (1+λ) evolutionary search on end-to-end KL(dense ‖ candidate).

- Database: every layer's attention and FFN pruned on the *dense* model's inputs at every level (0 … n_kv−1
  KV groups; FFN channels in steps of 1/`ffn_levels` of the width), OBS-compensated. A level is the first k units
  of the greedy removal order of the error curves (curves.py); its weights are one group-OBS update of those
  units, equal to the greedy's sequence of updates. Variants are made on demand and kept in a small LRU.
  Removed units are zeroed (o_proj / down_proj columns), so any combination of variants runs stitched.
- Fitness: KL of next-token distributions of the dense model vs the candidate on calibration tokens (never
  evaluation text), dense log-probabilities cached, a candidate recomputed from its first changed layer.
- Selection: λ offspring screened on a few sequences, the best few re-scored on all, kept only if better than
  the parent on the same tokens. Anytime: `should_stop()` ends the search with the best so far.
The chosen counts are then pruned for real by the sequential pipeline (`keep_heads`, `keep_ffn`).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from slimgpt_core import data
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.shapes import attention_unit_columns, count_parameters, unit_parameters
from slimgpt_core.methods import obs
from slimgpt_core.methods.forwards import capture_layer_inputs, run_layer
from slimgpt_core.schedules.curves import ModelCurves, dense_hessians, error_curves
from slimgpt_core.schedules.schedule import SCHEDULES, layer_ratios, units_to_remove

BASE_SCHEDULES = tuple(s for s in SCHEDULES if s != "auto")
HEAD_BALANCES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)  # head mean ratio as a fraction of the overall ratio


@dataclass
class SearchProgress:
    """One generation of the search (the studio draws the KL falling and moves the sliders)."""
    generation: int
    best_kl: float
    start_kl: float
    evaluations: int
    elapsed_s: float
    head_ratios: list[float]
    ffn_ratios: list[float]
    phase: str = "search"  # database | baselines | search | done
    kind: str = "search"


@dataclass
class AutoSettings:
    target_params: int | None = None  # parameters of the whole pruned model; else `ratio` of the layers' params
    ratio: float = 0.2
    ceiling: float = 0.9  # at most this fraction of any layer's KV groups / channels removed
    generations: int = 200
    max_seconds: float | None = None
    offspring: int = 8
    survivors: int = 2
    screen_samples: int = 2  # sequences each offspring is screened on
    ffn_levels: int = 40  # FFN levels per layer (2.5% of the width each)
    shape: float = 4.0
    seed: int = 0
    damp: float = 0.01
    batch_size: int = 8
    device: str = "auto"


@dataclass
class AutoSchedule:
    keep_heads: list[int]  # query heads kept per layer
    keep_ffn: list[int]  # FFN channels kept per layer
    head_ratios: list[float]  # fraction of KV groups removed
    ffn_ratios: list[float]
    params_before: int
    params_after: int
    target_params: int
    kl: float  # KL(dense ‖ auto) on all fitness tokens, at the search's FFN levels
    start: str  # the starting schedule (best of log/linear/uniform × head balances)
    start_kl: float
    baselines: dict[str, float]  # KL of every starting candidate
    generations: int
    evaluations: int
    seconds: float
    stopped: bool
    history: list[tuple[int, float]] = field(default_factory=list)


# --- parameter costs -----------------------------------------------------------------------------------------

def unit_costs(model) -> tuple[list[int], list[int]]:
    """Parameters one KV group (its query heads, K, V and o_proj columns) and one FFN channel remove, per layer."""
    units = [unit_parameters(layer) for layer in model.model.layers]
    return [u.per_kv_group for u in units], [u.per_channel for u in units]


# --- genome: removed KV groups and FFN levels per layer ----------------------------------------------------

class Budget:
    """Genome = KV groups removed per layer, then FFN channels removed per layer; its parameter cost and the
    budget-preserving moves between genomes (a head move is one KV group, an FFN move one level of channels)."""

    def __init__(self, curves: ModelCurves, head_cost: list[int], ffn_cost: list[int], remove: int, ceiling: float,
                 ffn_levels: int):
        self.curves, self.remove = curves, remove
        n = len(curves.layers)
        self.n = n
        self.step = [max(1, math.ceil(lc.n_ffn / ffn_levels)) for lc in curves.layers]
        self.max_head = [min(lc.n_kv - 1, int(ceiling * lc.n_kv + 1e-9)) for lc in curves.layers]
        self.max_ffn_ch = [min(lc.n_ffn - 1, int(ceiling * lc.n_ffn + 1e-9)) for lc in curves.layers]
        self.maximum = np.array(self.max_head + self.max_ffn_ch)
        self.cost = np.array(head_cost + ffn_cost)  # Python ints: int64
        self.head_cost, self.ffn_cost = head_cost, ffn_cost
        if self.removed_params(self.maximum) < remove:
            raise SlimGPTError(f"cannot remove {remove:,} parameters within a ceiling of {ceiling:.0%} per layer "
                               f"(at most {self.removed_params(self.maximum):,}): raise the ceiling or the target")

    def channels(self, g: np.ndarray) -> list[int]:
        return [int(c) for c in g[self.n:]]

    def removed_params(self, g: np.ndarray) -> int:
        return int(g @ self.cost)  # int64 genomes and costs

    def moved(self, g: np.ndarray, m: int, direction: int) -> int:
        """Module m's value after one move up (+1) or down (−1)."""
        size = 1 if m < self.n else self.step[m - self.n]
        return int(min(max(g[m] + direction * size, 0), self.maximum[m]))

    def repair(self, g: np.ndarray, rng: np.random.Generator, frozen: Sequence[int] = ()) -> np.ndarray:
        """Raise random modules until the budget is met, then lower random modules (not `frozen`) while it stays
        met: the result removes at least the budget and less than the budget plus one move."""
        g = g.copy()
        r = self.removed_params(g)
        while r < self.remove:
            up = [m for m in range(2 * self.n) if g[m] < self.maximum[m]]
            m = int(rng.choice(up))
            v = self.moved(g, m, 1)
            r += (v - int(g[m])) * int(self.cost[m])
            g[m] = v
        while True:
            down = [m for m in range(2 * self.n) if g[m] > 0 and m not in frozen
                    and r - (int(g[m]) - self.moved(g, m, -1)) * int(self.cost[m]) >= self.remove]
            if not down:
                return g
            m = int(rng.choice(down))
            v = self.moved(g, m, -1)
            r -= (int(g[m]) - v) * int(self.cost[m])
            g[m] = v

    def mutate(self, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raised = []
        g = g.copy()
        for _ in range(int(rng.integers(1, 3))):
            up = [m for m in range(2 * self.n) if g[m] < self.maximum[m]]
            m = int(rng.choice(up))
            g[m] = self.moved(g, m, 1)
            raised.append(m)
        return self.repair(g, rng, frozen=raised)

    def from_ratios(self, head_ratios: Sequence[float], ffn_ratios: Sequence[float]) -> np.ndarray:
        """The pipeline's counts for these ratios (within the ceiling)."""
        g = [min(units_to_remove(lc.n_kv, r), self.max_head[i]) for i, (lc, r) in
             enumerate(zip(self.curves.layers, head_ratios))]
        g += [min(units_to_remove(lc.n_ffn, r), self.max_ffn_ch[i]) for i, (lc, r) in
              enumerate(zip(self.curves.layers, ffn_ratios))]
        return np.array(g)

    def exact_channels(self, g: np.ndarray) -> list[int]:
        """FFN channels per layer with the excess over the budget given back one channel at a time, so the
        removed count is within one channel's parameters of the budget."""
        ch = self.channels(g)
        excess = self.removed_params(g) - self.remove
        for i in sorted(range(self.n), key=lambda i: -ch[i]):
            give = min(excess // self.ffn_cost[i], ch[i])
            ch[i] -= give
            excess -= give * self.ffn_cost[i]
        return ch


# --- variants and the stitched forward -------------------------------------------------------------------------

class VariantDatabase:
    """Dense-input OBS variants of every o_proj and down_proj, made on demand from the curves' removal orders."""

    def __init__(self, model, curves: ModelCurves, tokens: torch.Tensor, damp: float = 0.01, batch_size: int = 8,
                 device: str = "auto", should_stop: Callable[[], bool] | None = None, max_cached: int = 512):
        self.curves = curves
        self.inverse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for _, layer, H_attn, H_mlp in dense_hessians(model, tokens, batch_size, device, should_stop):
            Wo, Hi_o, _ = obs.damped_inverse(layer.self_attn.o_proj.weight.data.float(), H_attn, damp)
            Wd, Hi_d, _ = obs.damped_inverse(layer.mlp.down_proj.weight.data.float(), H_mlp, damp)
            self.inverse.append((Wo.cpu(), Hi_o.cpu(), Wd.cpu(), Hi_d.cpu()))
        self.group = [attention_unit_columns(layer) for layer in model.model.layers]
        self.cached: OrderedDict = OrderedDict()
        self.max_cached = max_cached

    def attention(self, layer: int, kv_removed: int) -> torch.Tensor:
        return self._variant(layer, "attn", kv_removed)

    def ffn(self, layer: int, channels: int) -> torch.Tensor:
        return self._variant(layer, "mlp", channels)

    def _variant(self, layer: int, module: str, count: int) -> torch.Tensor:
        key = (layer, module, count)
        if key in self.cached:
            self.cached.move_to_end(key)
            return self.cached[key]
        Wo, Hi_o, Wd, Hi_d = self.inverse[layer]
        lc = self.curves.layers[layer]
        if module == "attn":
            g = self.group[layer]
            cols = torch.tensor([u * g + j for u in lc.head_order[:count] for j in range(g)], dtype=torch.long)
            W = obs.removed_weights(Wo, Hi_o, cols)
        else:
            W = obs.removed_weights(Wd, Hi_d, torch.tensor(sorted(lc.ffn_order[:count]), dtype=torch.long))
        self.cached[key] = W
        if len(self.cached) > self.max_cached:
            del self.cached[next(iter(self.cached))]  # the least recently used
        return W


class StitchedModel:
    """The dense model run with database variants swapped into o_proj / down_proj; KL against the dense model."""

    def __init__(self, model, db: VariantDatabase, tokens: torch.Tensor, batch_size: int = 8, device: str = "auto"):
        self.model, self.db, self.bs = model, db, batch_size
        self.dev = resolve_device(device)
        model.to(self.dev)
        self.x0, self.kwargs = capture_layer_inputs(model, tokens, batch_size, self.dev)
        self.n = len(model.model.layers)
        dense_kv, dense_ch = [0] * self.n, [0] * self.n
        self.dense_logp = [self._logp(h) for h in self._batches(self.run(dense_kv, dense_ch)[-1])]

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

    def kl(self, final: torch.Tensor, samples: Sequence[int]) -> float:
        """Mean KL(dense ‖ candidate) per token over these calibration sequences (final: their hidden states)."""
        total, count = 0.0, 0
        for s in range(0, len(samples), self.bs):
            idx = list(samples[s:s + self.bs])
            dense = torch.cat([self.dense_logp[i // self.bs][i % self.bs:i % self.bs + 1] for i in idx])
            cand = self._logp(final[s:s + self.bs])
            total += float((dense.exp() * (dense - cand)).sum())
            count += dense.shape[0] * dense.shape[1]
        return total / count


# --- the search ------------------------------------------------------------------------------------------------

def removal_budget(model, settings: AutoSettings) -> tuple[int, int, int]:
    """(parameters before, target parameters after, parameters to remove)."""

    before = count_parameters(model)
    if settings.target_params is not None:
        target = int(settings.target_params)
    else:
        target = before - int(round(settings.ratio * count_parameters(model.model.layers)))
    if not 0 < target < before:
        raise SlimGPTError(f"target of {target:,} parameters must be between 1 and the model's {before:,}")
    return before, target, before - target


class _Scorer:
    """Genomes decoded and scored by KL(dense ‖ candidate) on the stitched model; counts the evaluations."""

    def __init__(self, net: StitchedModel, budget: Budget, curves: ModelCurves, samples: list[int]):
        self.net, self.budget, self.curves, self.n = net, budget, curves, budget.n
        self.all_samples = samples
        self.evaluations = 0

    def decode(self, g):
        return [int(k) for k in g[:self.n]], self.budget.channels(g)

    def ratios(self, g):
        kv, ch = self.decode(g)
        return ([k / lc.n_kv for k, lc in zip(kv, self.curves.layers)],
                [c / lc.n_ffn for c, lc in zip(ch, self.curves.layers)])

    def full(self, g):
        """(KL on all fitness sequences, hidden states entering every layer)."""
        self.evaluations += 1
        states = self.net.run(*self.decode(g))
        return self.net.kl(states[-1], self.all_samples), states


def _starting_schedules(budget: Budget, curves: ModelCurves, head_cost: list[int], ffn_cost: list[int], remove: int,
                        settings: AutoSettings, starts: dict | None) -> dict:
    """log / linear / uniform at several head-vs-FFN balances, after the caller's `starts` (name → head ratios,
    FFN ratios); the FFN ratios fill the budget left after the heads."""
    layer_share = remove / sum(h * lc.n_kv + f * lc.n_ffn for h, f, lc in zip(head_cost, ffn_cost, curves.layers))
    candidates = dict(starts or {})
    for kind in BASE_SCHEDULES:
        for balance in HEAD_BALANCES:
            try:
                heads = layer_ratios(budget.n, min(0.95, balance * layer_share), kind, settings.shape)
            except SlimGPTError:
                continue
            candidates[f"{kind} heads×{balance:g}"] = (heads, _ffn_fill(budget, heads, kind, settings))
    return candidates


def _best_start(candidates: dict, budget: Budget, scorer: _Scorer, settings: AutoSettings, stop) -> tuple[dict, tuple]:
    """Every starting schedule fitted to the budget and scored: ({name: KL}, (kl, genome, states, name) of the
    best). Stop ends the scoring once one is scored."""
    baselines, best = {}, None
    for name, (heads, ffn) in candidates.items():
        if stop() and best is not None:
            break
        g = budget.repair(budget.from_ratios(heads, ffn), np.random.default_rng(settings.seed))
        kl, states = scorer.full(g)
        baselines[name] = kl
        if best is None or kl < best[0]:
            best = (kl, g, states, name)
    return baselines, best


def _evolve(scorer: _Scorer, budget: Budget, start: tuple, settings: AutoSettings, rng: np.random.Generator, stop,
            progress: Callable[[int, float, np.ndarray], None], elapsed: Callable[[], float]):
    """The (1+λ) generations from the start (kl, genome, states); returns (kl, genome, generations, stopped,
    history)."""
    net, n, all_samples = scorer.net, scorer.n, scorer.all_samples
    parent_kl, parent, parent_states = start
    history = [(0, parent_kl)]
    generation, stopped = 0, False
    for generation in range(1, settings.generations + 1):
        if stop() or (settings.max_seconds is not None and elapsed() > settings.max_seconds):
            stopped = stop()
            generation -= 1
            break
        screen = sorted(rng.choice(all_samples, min(settings.screen_samples, len(all_samples)), False).tolist())
        scored = []
        for _ in range(settings.offspring):
            child = budget.mutate(parent, rng)  # differs from the parent: the modules it raises stay raised
            first = int(np.nonzero((child[:n] != parent[:n]) | (child[n:] != parent[n:]))[0].min())
            states = net.run(*scorer.decode(child), first, parent_states[first][screen])
            scorer.evaluations += 1
            scored.append((net.kl(states[-1], screen), child, first))
        scored.sort(key=lambda s: s[0])
        for _, child, first in scored[:settings.survivors]:
            states = parent_states[:first] + net.run(*scorer.decode(child), first, parent_states[first])
            scorer.evaluations += 1
            kl = net.kl(states[-1], all_samples)
            if kl < parent_kl:
                parent_kl, parent, parent_states = kl, child, states
        history.append((generation, parent_kl))
        progress(generation, parent_kl, parent)
    return parent_kl, parent, generation, stopped, history


def search(model, tokens: torch.Tensor, fitness_tokens: torch.Tensor, settings: AutoSettings,
           callback: Callable | None = None, should_stop: Callable[[], bool] | None = None,
           curves: ModelCurves | None = None,
           starts: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> AutoSchedule:
    """Find per-layer KV groups and FFN channels to remove for the budget; see the module docstring.

    `tokens`: the calibration tokens (statistics, database); `fitness_tokens`: other calibration text for the KL.
    `starts`: more starting schedules (name → head ratios, FFN ratios), e.g. log/linear/uniform at the requested
    ratio; each is fitted to the budget and scored with the built-in log/linear/uniform × head balances."""
    t0 = time.perf_counter()

    def emit(event):
        if callback is not None:
            callback(event)
    stop = should_stop or bool  # bool() is False
    rng = np.random.default_rng(settings.seed)
    before, target, remove = removal_budget(model, settings)
    curves = curves or error_curves(model, tokens, settings.damp, settings.batch_size, settings.device,
                                    should_stop=should_stop)
    head_cost, ffn_cost = unit_costs(model)
    budget = Budget(curves, head_cost, ffn_cost, remove, settings.ceiling, settings.ffn_levels)
    emit(SearchProgress(0, math.nan, math.nan, 0, time.perf_counter() - t0, [], [], "database"))
    db = VariantDatabase(model, curves, tokens, settings.damp, settings.batch_size, settings.device, should_stop)
    net = StitchedModel(model, db, fitness_tokens, settings.batch_size, settings.device)
    scorer = _Scorer(net, budget, curves, list(range(fitness_tokens.shape[0])))
    emit(SearchProgress(0, math.nan, math.nan, 0, time.perf_counter() - t0, [], [], "baselines"))
    candidates = _starting_schedules(budget, curves, head_cost, ffn_cost, remove, settings, starts)
    baselines, (start_kl, parent, parent_states, start) = _best_start(candidates, budget, scorer, settings, stop)
    emit(SearchProgress(0, start_kl, start_kl, scorer.evaluations, time.perf_counter() - t0, *scorer.ratios(parent)))

    def progress(generation, kl, g):
        emit(SearchProgress(generation, kl, start_kl, scorer.evaluations, time.perf_counter() - t0, *scorer.ratios(g)))
    parent_kl, parent, generation, stopped, history = _evolve(scorer, budget, (start_kl, parent, parent_states),
                                                              settings, rng, stop, progress,
                                                              lambda: time.perf_counter() - t0)
    kv = [int(k) for k in parent[:budget.n]]
    ch = budget.exact_channels(parent)
    params_after = before - sum(k * c for k, c in zip(kv, head_cost)) - sum(c * f for c, f in zip(ch, ffn_cost))
    result = AutoSchedule(
        keep_heads=[(lc.n_kv - k) * lc.heads_per_unit for k, lc in zip(kv, curves.layers)],
        keep_ffn=[lc.n_ffn - c for c, lc in zip(ch, curves.layers)],
        head_ratios=[k / lc.n_kv for k, lc in zip(kv, curves.layers)],
        ffn_ratios=[c / lc.n_ffn for c, lc in zip(ch, curves.layers)],
        params_before=before, params_after=params_after, target_params=target, kl=parent_kl, start=start,
        start_kl=start_kl, baselines=baselines, generations=generation, evaluations=scorer.evaluations,
        seconds=time.perf_counter() - t0, stopped=stopped, history=history)
    emit(SearchProgress(generation, parent_kl, start_kl, scorer.evaluations, result.seconds, result.head_ratios,
                        result.ffn_ratios, "done"))
    return result


def _ffn_fill(budget: Budget, head_ratios: Sequence[float], kind: str, settings: AutoSettings) -> list[float]:
    """FFN ratios of this schedule kind whose mean just meets the budget left after these head removals."""
    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        try:
            ffn = layer_ratios(budget.n, mid, kind, settings.shape)
        except SlimGPTError:
            hi = mid
            continue
        if budget.removed_params(budget.from_ratios(head_ratios, ffn)) >= budget.remove:
            hi = mid
        else:
            lo = mid
    try:
        return layer_ratios(budget.n, hi, kind, settings.shape)
    except SlimGPTError:
        return [hi] * budget.n  # hi ≤ 0.95


def auto_job(loaded, calib: str, nsamples: int, seqlen: int, seed: int, settings: AutoSettings,
             starts: dict | None = None, callback=None, should_stop=None) -> AutoSchedule:
    """For the studio's job runner: the search on calibration windows `seed` (database) and `seed`+1 (fitness);
    stopping returns the best schedule so far."""

    tokens = data.calibration_tokens(loaded.tokenizer, calib, nsamples, seqlen, seed)
    fitness = data.calibration_tokens(loaded.tokenizer, calib, 8, min(128, seqlen), seed + 1)
    home = next(loaded.model.parameters()).device
    try:
        return search(loaded.model, tokens, fitness, settings, callback, should_stop, starts=starts)
    finally:
        loaded.model.to(home)
