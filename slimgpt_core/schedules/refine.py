"""`auto` as an anytime job: a fast first schedule (global_allocation.py) in about a minute, then a (1+λ) search on
end-to-end KL (SPEC §10) that refines it for as long as it is allowed to, Stop keeping the best so far.

Phases, each reported with a fraction and an estimate of the seconds left (`AutoProgress`):
- `curves`: the error curves (cached in cache/stats with the dense statistics they come from);
- `database`: the dense statistics' inverses; the variants themselves (o_proj / down_proj OBS-pruned on dense
  inputs at a level) are made lazily, when a candidate asks for one (so the search's neighbourhood first), and kept
  on disk in cache/stats, keyed by model, calibration tokens and damping: a second run, or a run at another
  ratio, reuses them;
- `sensitivity`: one forward and backward for the Fisher of every module's output;
- `fast`: the global allocation at a few heads/FFN balances and the log schedule fitted to the same budget,
  scored by KL; the lowest is the fast schedule (the first allocation is sent at once, before any KL);
- `search`: (1+λ) from the fast schedule on the whole fitness pool: λ offspring screened on a few windows, those
  better than the parent there checked on a few other windows, the best of those scored on the pool and kept only
  if better than the parent on it; the windows are drawn afresh every generation, so a schedule does not win by
  fitting a few fixed windows. The parent's KL is kept per window and a child's rows are reused from one step to
  the next, so no window is run twice for one child.
The result says which schedule it is (fast, or refined at generation g) and its KL.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from slimgpt_core.base import cache
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.data import calibration_tokens
from slimgpt_core.base.shapes import count_parameters
from slimgpt_core.schedules import global_allocation as ga
from slimgpt_core.schedules.stitched import StitchedModel, VariantDatabase, unit_costs
from slimgpt_core.schedules.curves import ModelCurves, error_curves
from slimgpt_core.schedules.schedule import AUTO_FITNESS_SAMPLES

VARIANTS_VERSION = "variants-v1"
LOG_HEAD_SHARES = (None, 0.5, 0.25)  # the fast phase's log candidates: heads at this share of the budget's ratio


@dataclass
class AutoProgress:
    """What the studio shows while `auto` runs: the phase with its fraction and estimate, and the best schedule so
    far (which one, its KL, its ratios)."""
    phase: str  # curves | database | sensitivity | fast | search | done
    fraction: float  # of this phase
    eta_s: float | None  # seconds this phase still needs (None: not known yet)
    elapsed_s: float
    best: str = ""  # "" (none yet) | fast | refined
    best_kl: float = math.nan
    fast_kl: float = math.nan
    generation: int = 0
    evaluations: int = 0
    head_ratios: list[float] = field(default_factory=list)
    ffn_ratios: list[float] = field(default_factory=list)
    variants_built: int = 0
    variants_from_disk: int = 0
    kind: str = "auto"


@dataclass
class AutoConfig:
    budget: ga.BudgetSpec = field(default_factory=ga.BudgetSpec)
    max_seconds: float | None = 600.0  # the whole job, fast phase included (None: only `generations` ends it)
    generations: int | None = None  # at most this many search generations (None: no limit)
    fast_seconds: float = 30.0  # the fast phase scores candidates until this many seconds have passed (≥ 2 scored)
    fast_samples: int = 8  # the Fisher and the fast phase's KL: the first this many fitness windows
    refine: bool = True
    offspring: int = 8
    survivors: int = 2
    screen_samples: int = 2
    check_samples: int = 8  # survivors of the screen are checked on this many other windows before the whole pool
    ffn_levels: int = 40  # FFN moves: 1/40 of the width
    shape: float = 4.0  # of the log schedule among the fast candidates
    seed: int = 0
    damp: float = 0.01
    batch_size: int = 8
    device: str = "auto"
    snapshots: Sequence[float] = ()  # also keep the best schedule as it was at these elapsed seconds


@dataclass
class AutoResult:
    keep_heads: list[int]  # query heads kept per layer
    keep_ffn: list[int]
    head_ratios: list[float]  # fraction of KV groups removed per layer
    ffn_ratios: list[float]
    params_before: int
    params_after: int
    remove: int  # parameters the budget asked to remove
    which: str  # fast | refined
    kl: float  # KL(dense ‖ this) on `kl_samples` fitness windows (at the search's FFN moves; nan: stopped before any KL)
    fast: str  # the fast candidate chosen
    fast_kl: float  # the fast schedule's KL on the same windows
    candidates: dict[str, float]  # KL of every fast candidate scored (on the fast phase's windows)
    generation: int  # the generation that found it (0: the fast schedule)
    generations: int  # generations run
    evaluations: int
    fast_seconds: float  # until the fast schedule was chosen
    seconds: float
    stopped: bool  # by Stop (not by the time or generation limit)
    history: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, generation, best KL)
    snapshots: dict[float, dict] = field(default_factory=dict)  # seconds → {keep_heads, keep_ffn, kl, which, ...}
    variants_built: int = 0
    variants_from_disk: int = 0
    fast_keep_heads: list[int] = field(default_factory=list)  # the fast schedule, for comparing it with the result
    fast_keep_ffn: list[int] = field(default_factory=list)
    kl_samples: int = 0  # the fitness windows `kl` and `fast_kl` are on: the pool once the search ran

    def describe(self) -> str:
        what = "the fast schedule" if self.which == "fast" else f"refined at generation {self.generation}"
        kl = f"KL {self.kl:.4f}" if math.isfinite(self.kl) else "no KL yet"
        return (f"{what} ({kl}; fast {self.fast}, KL {self.fast_kl:.4f}), after {self.generations} generations in "
                f"{self.seconds:.0f} s")


class DiskVariantDatabase(VariantDatabase):
    """The variant database with every variant also kept in cache/stats (key: model, calibration tokens, damping,
    layer, module, count), so runs share them."""

    def __init__(self, model, curves: ModelCurves, tokens: torch.Tensor, damp: float = 0.01, batch_size: int = 8,
                 device: str = "auto", should_stop: Callable[[], bool] | None = None, max_cached: int = 512,
                 progress: Callable[[int, int], None] | None = None):
        super().__init__(model, curves, tokens, damp, batch_size, device, should_stop, max_cached, progress,
                         "variants")
        self.prefix = variant_key_prefix(model, tokens, damp)
        self.built = self.from_disk = 0

    def disk_key(self, layer: int, module: str, count: int) -> str:
        return f"{self.prefix}|{layer}|{module}|{count}"

    def _make(self, layer: int, module: str, count: int) -> torch.Tensor:
        found = cache.lookup_tensors("stats", self.disk_key(layer, module, count))
        if found is not None:
            self.from_disk += 1
            return found["W"]
        W = super()._make(layer, module, count)
        self.built += 1
        cache.store_tensors("stats", self.disk_key(layer, module, count), {"W": W.contiguous()})
        return W


def variant_key_prefix(model, tokens: torch.Tensor, damp: float) -> str:
    """What every cached variant of this model, calibration and damping has in its key."""
    return f"{VARIANTS_VERSION}|{cache.model_fingerprint(model)}|{cache.tokens_digest(tokens)}|{damp}"


def module_sensitivities(fisher: ga.OutputFisher, db: VariantDatabase, budget: ga.GroupBudget) -> list[float]:
    """Per module (heads of every layer, then FFN): the Fisher of its output met by its own pruning error at the
    budget's mean fraction (global_allocation.directional_sensitivity, from the dense W and H⁻¹: no variant)."""
    G_attn, G_mlp = fisher.attn, fisher.mlp
    share = budget.remove / max(1, budget._all(list(range(2 * budget.n))))
    out = []
    for m in range(2 * budget.n):
        layer, attn = m % budget.n, m < budget.n
        k = ga.probe_level(int(budget.units[m]), int(budget.maximum[m]), share, 1 if attn else int(budget.step[m]))
        module = "attn" if attn else "mlp"
        out.append(ga.directional_sensitivity(G_attn[layer] if attn else G_mlp[layer], *db.dense(layer, module),
                                              db.columns(layer, module, k)))
    return out


class _AutoRun:
    """One `auto_schedule` run: its clock, its progress events and what its phases share (the state the events
    report, the curves, the budget, the variants, the stitched model and the current parent)."""

    def __init__(self, config: AutoConfig, callback: Callable | None, should_stop: Callable[[], bool] | None):
        self.t0 = time.perf_counter()
        self.config, self.callback, self.should_stop = config, callback, should_stop
        self.stop = should_stop or bool
        self.state: dict = {"best": "", "kl": math.nan, "fast_kl": math.nan, "generation": 0, "found_at": 0,
                            "evaluations": 0, "g": None}
        self.db: DiskVariantDatabase | None = None
        self.n_kv: list[int] = []
        self.n_ffn: list[int] = []
        self.snapshots: dict[float, dict] = {}
        self.pending = sorted(config.snapshots)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def ratios(self, g):
        n = len(self.n_kv)
        return ([int(k) / u for k, u in zip(g[:n], self.n_kv)], [int(c) / u for c, u in zip(g[n:], self.n_ffn)])

    def emit(self, phase: str, fraction: float, eta: float | None):
        if self.callback is None:
            return
        state, db, g = self.state, self.db, self.state["g"]
        hr, fr = self.ratios(g) if g is not None else ([], [])
        self.callback(AutoProgress(phase, max(0.0, min(1.0, fraction)), eta, self.elapsed(), state["best"],
                                   state["kl"], state["fast_kl"], state["generation"], state["evaluations"], hr, fr,
                                   db.built if db else 0, db.from_disk if db else 0))

    def phase_progress(self, phase: str):
        started = time.perf_counter()

        def report(done: int, total: int):
            spent = time.perf_counter() - started
            self.emit(phase, done / total, spent / done * (total - done) if done else None)
        return report

    def prepare(self, model, tokens: torch.Tensor, fitness: torch.Tensor, curves: ModelCurves | None) -> None:
        """The phases before any schedule: curves, budget, variant database, stitched model, sensitivities."""
        config = self.config
        self.emit("curves", 0.0, None)
        self.curves = curves or error_curves(model, tokens, config.damp, config.batch_size, config.device,
                                             progress=self.phase_progress("curves"), should_stop=self.should_stop)
        self.n = len(self.curves.layers)
        self.n_kv, self.n_ffn = [lc.n_kv for lc in self.curves.layers], [lc.n_ffn for lc in self.curves.layers]
        head_cost, ffn_cost = unit_costs(model)
        self.budget = ga.GroupBudget(self.n_kv, self.n_ffn, head_cost, ffn_cost, config.budget,
                                     count_parameters(model), count_parameters(model.model.layers), config.ffn_levels)
        self.emit("database", 0.0, None)
        self.db = DiskVariantDatabase(model, self.curves, tokens, config.damp, config.batch_size, config.device,
                                      self.should_stop, progress=self.phase_progress("database"))
        if self.stop():
            raise JobCancelled("auto was stopped before its first schedule")
        self.emit("sensitivity", 0.0, None)
        model.to(resolve_device(config.device))
        self.fast_samples = list(range(min(config.fast_samples, fitness.shape[0])))
        fisher = ga.output_fisher(model, fitness[self.fast_samples], config.batch_size, config.seed)
        self.sensitivity = module_sensitivities(fisher, self.db, self.budget)
        given = fisher.dense_logp
        if len(self.fast_samples) % config.batch_size and len(self.fast_samples) < fitness.shape[0]:
            given = given[:-1]  # a short last batch is not one of the pool's batches: made again when needed
        self.net = StitchedModel(model, self.db, fitness, config.batch_size, config.device, given)
        self.emit("sensitivity", 1.0, 0.0)
        self.all_samples = list(range(fitness.shape[0]))

    def plans(self) -> list[tuple[str, Callable[[], np.ndarray]]]:
        """The fast candidates: the allocation at a few balances and the log schedule fitted to the budget at a few
        heads/FFN shares."""
        curves, budget, sensitivity, n_kv, n_ffn = self.curves, self.budget, self.sensitivity, self.n_kv, self.n_ffn
        shape = self.config.shape
        if len(budget.groups) == 2:  # heads and FFN apart: no balance to choose
            return [("global", lambda: ga.allocate(curves, budget, sensitivity)),
                    ("log", lambda: ga.fitted_schedule(budget, n_kv, n_ffn, "log", shape))]
        allocations = [(f"global β={b:g}", lambda b=b: ga.allocate(curves, budget, sensitivity, b))
                       for b in ga.BALANCES]
        # log with fewer heads removed than FFN: at high ratios most of a searched schedule's gain over log is
        # this balance (SPEC §10), so it is scored early
        logs = [(f"log heads×{h:g}" if h is not None else "log",
                 lambda h=h: ga.fitted_schedule(budget, n_kv, n_ffn, "log", shape, h)) for h in LOG_HEAD_SHARES]
        return [allocations[0], logs[0], logs[1], *allocations[1:3], logs[2], *allocations[3:]]

    def fast(self) -> tuple[float, np.ndarray, list | None, str]:
        """Score the plans by KL (at least two, then while `fast_seconds` last); the best as (kl, genome, states,
        name), or the first allocation unscored when stopped before any KL. Fills `candidates`."""
        config, state, budget, n = self.config, self.state, self.budget, self.n
        plans = self.plans()
        self.candidates: dict[str, float] = {}
        seen: dict[bytes, str] = {}
        fast_start = time.perf_counter()
        best = None  # (kl, genome, states, name)
        for i, (name, plan) in enumerate(plans):
            g = plan()
            if not budget.meets(g):
                raise SlimGPTError(f"internal: the {name} candidate misses the budget")  # a bug, never bad input
            if state["g"] is None:  # the first allocation goes to the sliders before any KL
                state.update(best="fast", g=g, fast=name)
                self.emit("fast", 0.0, None)
            if g.tobytes() in seen:
                self.candidates[name] = self.candidates[seen[g.tobytes()]]
                continue
            seen[g.tobytes()] = name
            if len(self.candidates) >= 2 and (self.stop() or time.perf_counter() - fast_start > config.fast_seconds):
                break
            if self.stop() and best is not None:
                break
            states = self.net.run(*_decode(g, n), 0, self.net.x0[:len(self.fast_samples)])
            state["evaluations"] += 1
            kl = self.net.kl(states[-1], self.fast_samples)
            self.candidates[name] = kl
            if best is None or kl < best[0]:
                best = (kl, g, states, name)
                state.update(kl=kl, fast_kl=kl, g=g, fast=name)
            spent = time.perf_counter() - fast_start
            self.emit("fast", (i + 1) / len(plans), max(0.0, min(config.fast_seconds - spent,
                                                                spent / (i + 1) * (len(plans) - i - 1))))
            if self.stop():
                break
        return best if best is not None else (math.nan, state["g"], None, state["fast"])

    def widen(self) -> None:
        """The parent (the fast schedule) run on the rest of the fitness pool: the search compares on all of it, and
        keeps the parent's KL on every window so that comparing on a few of them needs no forward."""
        done = len(self.fast_samples)
        if self.parent_states is not None:
            if done < len(self.all_samples):
                self.emit_search(0)
                rest = self.net.run(*_decode(self.parent, self.n), 0, self.net.x0[done:])
                self.parent_states = [torch.cat([a, b]) for a, b in zip(self.parent_states, rest)]
            self.parent_rows = self.net.window_kl(self.parent_states[-1], self.all_samples)
            self.parent_kl = float(self.parent_rows.mean())
            self.state.update(kl=self.parent_kl, fast_kl=self.parent_kl)
        self.kl_samples = len(self.all_samples)

    def summary(self) -> dict:
        return _summary(self.budget, self.parent, self.parent_kl, self.state, self.n_kv, self.n_ffn, self.curves)

    def interrupted(self) -> bool:
        """Stop, or the job's seconds are spent: a generation ends at its next scoring."""
        limit = self.config.max_seconds
        return self.stop() or (limit is not None and self.elapsed() >= limit)

    def snapshot_due(self) -> None:
        while self.pending and self.elapsed() >= self.pending[0]:
            self.snapshots[self.pending.pop(0)] = self.summary()

    def refine(self, rng: np.random.Generator) -> tuple[int, bool]:
        """The (1+λ) search from the parent until a limit or Stop; returns (generations run, stopped)."""
        config = self.config
        generation, stopped = 0, self.stop()
        limit = config.max_seconds
        while config.refine and self.parent_states is not None and not stopped:
            self.snapshot_due()
            if (limit is not None and self.elapsed() >= limit) or (config.generations is not None
                                                                   and generation >= config.generations):
                break
            if self.stop():
                stopped = True
                break
            generation += 1
            self.next_generation(generation, rng)
            self.state["generation"] = generation
            self.history.append((self.elapsed(), generation, self.parent_kl))
            self.emit_search(generation)
            stopped = self.stop()
        self.snapshot_due()
        return generation, stopped

    def next_generation(self, generation: int, rng: np.random.Generator) -> None:
        """λ offspring screened on a few windows; the best few of those better than the parent there checked on a
        few other windows; the best of those better there too scored on the whole pool, kept only if better than
        the parent on it. (A pool no larger than screen and check together: the survivors straight to the pool.)
        The parent's KL per window is kept, and the pool scoring runs the child only on the windows it has not run
        on yet: its screen and check rows are reused."""
        config, n, parent_states = self.config, self.n, self.parent_states  # the parent of this generation
        pool = self.all_samples
        screen = sorted(rng.choice(pool, min(config.screen_samples, len(pool)), False).tolist())
        scored = []  # (KL on the windows so far, child, first changed layer, [(windows, states, KL rows)])
        for _ in range(config.offspring):
            child = self.budget.mutate(self.parent, rng)
            changed = np.nonzero(child != self.parent)[0]
            if len(changed) == 0:
                continue
            first = int((changed % n).min())
            kl, part = self._score(child, first, parent_states, screen)
            scored.append((kl, child, first, [part]))
            if self.interrupted():
                return
        # only offspring that beat the parent on the screening windows go on: late in a search most do not, and the
        # larger scorings are most of a generation's forward passes
        parent_screen = float(self.parent_rows[screen].mean())
        scored = sorted((s for s in scored if s[0] < parent_screen), key=lambda s: s[0])[:config.survivors]
        if scored and len(screen) + config.check_samples < len(pool):
            if self.interrupted():
                return
            others = [i for i in pool if i not in screen]
            check = sorted(rng.choice(others, config.check_samples, False).tolist())
            parent_check = float(self.parent_rows[check].mean())
            checked = []
            for _, child, first, parts in scored:
                if self.interrupted():
                    return
                kl, part = self._score(child, first, parent_states, check)
                checked.append((kl, child, first, parts + [part]))
            scored = sorted((s for s in checked if s[0] < parent_check), key=lambda s: s[0])[:1]
        for _, child, first, parts in scored:
            if self.interrupted():
                break
            seen = {i for windows, _, _ in parts for i in windows}
            rest = [i for i in pool if i not in seen]
            if rest:
                parts.append(self._score(child, first, parent_states, rest)[1])
            states, rows = _assemble(parts, len(pool))
            kl = float(rows.mean())
            if kl < self.parent_kl:
                self.snapshot_due()  # a snapshot due before now is of the parent this child replaces
                self.parent_kl, self.parent, self.parent_rows = kl, child, rows
                self.parent_states = parent_states[:first] + states
                self.state.update(best="refined", kl=kl, g=child, found_at=generation)

    def _score(self, child: np.ndarray, first: int, parent_states: list[torch.Tensor],
               windows: list[int]) -> tuple[float, tuple]:
        """The child of the parent with these states run from its first changed layer on these pool windows: (its
        KL there, (windows, its hidden states entering layers first … n, its KL per window))."""
        states = self.net.run(*_decode(child, self.n), first, parent_states[first][windows])
        self.state["evaluations"] += 1
        rows = self.net.window_kl(states[-1], windows)
        return float(rows.mean()), (windows, states, rows)

    def emit_search(self, generation: int) -> None:
        config, limit = self.config, self.config.max_seconds
        if limit is not None:
            self.emit("search", self.elapsed() / limit, max(0.0, limit - self.elapsed()))
        elif config.generations:
            self.emit("search", generation / config.generations,
                      self.elapsed() / generation * (config.generations - generation) if generation else None)
        else:
            self.emit("search", 0.0, None)


def auto_schedule(model, tokens: torch.Tensor, fitness: torch.Tensor, config: AutoConfig,
                  callback: Callable | None = None, should_stop: Callable[[], bool] | None = None,
                  curves: ModelCurves | None = None) -> AutoResult:
    """The fast schedule, then the refining search; see the module docstring. `tokens`: calibration (statistics,
    curves, variants); `fitness`: other calibration windows the KL is measured on (never evaluation text).
    Stop before the first schedule exists raises JobCancelled; after, it returns the best so far."""
    run = _AutoRun(config, callback, should_stop)
    rng = np.random.default_rng(config.seed)
    run.prepare(model, tokens, fitness, curves)
    best = run.fast()
    fast_seconds = run.elapsed()
    run.parent_kl, run.parent, run.parent_states, fast_name = best
    fast_summary = run.summary()
    run.kl_samples = len(run.fast_samples)
    if config.refine and not run.stop():
        run.widen()
    run.history = [(run.elapsed(), 0, run.parent_kl)]
    generation, stopped = run.refine(rng)
    result = AutoResult(**run.summary(), params_before=run.budget.params_before, remove=run.budget.remove,
                        fast=fast_name, fast_kl=run.state["fast_kl"], candidates=run.candidates,
                        generations=generation, kl_samples=run.kl_samples,
                        evaluations=run.state["evaluations"], fast_seconds=fast_seconds, seconds=run.elapsed(),
                        stopped=stopped, history=run.history, snapshots=run.snapshots, variants_built=run.db.built,
                        variants_from_disk=run.db.from_disk, fast_keep_heads=fast_summary["keep_heads"],
                        fast_keep_ffn=fast_summary["keep_ffn"])
    run.state["g"] = run.parent
    run.emit("done", 1.0, 0.0)
    return result


def _assemble(parts: list[tuple[list[int], list[torch.Tensor], torch.Tensor]], size: int):
    """One run's hidden states and KL rows on the whole pool from its runs on disjoint sets of windows that cover
    it."""
    states = []
    for layer in range(len(parts[0][1])):
        like = parts[0][1][layer]  # (windows, tokens, hidden) of one part
        whole = like.new_empty((size, *like.shape[1:]))
        for windows, part_states, _ in parts:
            whole[windows] = part_states[layer]
        states.append(whole)
    rows = torch.empty(size, dtype=torch.float64)
    for windows, _, part_rows in parts:
        rows[windows] = part_rows
    return states, rows


def _decode(g: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    return [int(k) for k in g[:n]], [int(c) for c in g[n:]]


def _summary(budget: ga.GroupBudget, g: np.ndarray, kl: float, state: dict, n_kv, n_ffn, curves) -> dict:
    """The schedule a genome stands for, with FFN channels given back to the exact budget."""
    exact = budget.exact(g)
    n = budget.n
    kv, ch = _decode(exact, n)
    return dict(keep_heads=[(u - k) * lc.heads_per_unit for k, u, lc in zip(kv, n_kv, curves.layers)],
                keep_ffn=[u - c for c, u in zip(ch, n_ffn)],
                head_ratios=[k / u for k, u in zip(kv, n_kv)], ffn_ratios=[c / u for c, u in zip(ch, n_ffn)],
                params_after=budget.params_before - budget.removed(exact), which=state["best"] or "fast", kl=kl,
                generation=state["found_at"] if state["best"] == "refined" else 0)


def auto_job(loaded, calib: str, nsamples: int, seqlen: int, seed: int, config: AutoConfig,
             fitness_samples: int = AUTO_FITNESS_SAMPLES,
             fitness_seqlen: int = 128, callback=None, should_stop=None) -> AutoResult:
    """For the studio's job runner: calibration windows `seed` (curves, variants) and `seed`+1 (the KL)."""
    tokens = calibration_tokens(loaded.tokenizer, calib, nsamples, seqlen, seed)
    fitness = calibration_tokens(loaded.tokenizer, calib, fitness_samples, min(fitness_seqlen, seqlen), seed + 1)
    home = next(loaded.model.parameters()).device
    try:
        return auto_schedule(loaded.model, tokens, fitness, config, callback, should_stop)
    finally:
        loaded.model.to(home)
