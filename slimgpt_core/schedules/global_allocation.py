"""The fast `auto` schedule: one global allocation over every layer's heads and FFN channels (SPEC §7), on costs
made comparable across layers by a measured sensitivity of the model's output (SPEC §10, issue: `auto` in a
minute).

- **Budget.** Parameters to remove: a ratio of the decoder layers' or of the whole model's parameters, or a target
  parameter count; heads and FFN together (one budget, the allocation picks the balance) or apart (a head ratio of
  the KV groups' parameters and an FFN ratio of the channels' parameters, each met on its own); every layer keeps
  at least `min_keep` of its KV groups and of its channels (and at least one of each).
- **Costs.** The error curves (curves.py) give each module's OBS-predicted output error E(k) on dense inputs for k
  units removed. An error δ added to a module's output changes the model's next-token distribution by about
  ½·δᵀGδ in KL, with G = E[g gᵀ] the Fisher of the output (g: gradient of the log-likelihood of labels sampled
  from the model, as in LLM Surgeon's KFAC factor). `sensitivity` measures G once per o_proj and down_proj output
  (one forward and backward) and reduces it to one number per module, tr(G ΔW H ΔWᵀ)/tr(ΔW H ΔWᵀ) at a probe
  level: the cost of k units is then sensitivity × E(k), in comparable units across layers.
- **Allocation.** Greedy on the lower convex hulls of every module's (parameters removed, cost) curve: segments
  are taken in order of cost per parameter until the budget is met, the FFN in steps of `ffn_levels` of the width
  (the search's moves), then channels are given back one at a time so the result lands within one channel of the
  budget. On convex curves this greedy is the exact optimum of the relaxed problem (a Lagrangian sweep).
- **Balance.** A weight β on the head costs moves the heads/FFN balance; `candidates` builds the allocation at a
  few β and the log schedule fitted to the same budget, and the caller (refine.py) keeps the one of lowest KL.
No Streamlit here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.schedules.curves import ModelCurves
from slimgpt_core.schedules.schedule import layer_ratios, units_to_remove

BALANCES = (1.0, 2.0, 0.5, 4.0, 0.25)  # weights on the head costs, in the order the fast phase tries them
SCOPES = ("layers", "model")


@dataclass
class BudgetSpec:
    """What `auto` must remove. `target_params` wins over `ratio`; `head_ratio` with `ffn_ratio` sets the heads'
    and the FFN's budgets apart (each a fraction of its own removable parameters)."""
    ratio: float = 0.2
    scope: str = "layers"  # the ratio is of the decoder layers' parameters, or of the whole model's
    target_params: int | None = None  # parameters of the whole pruned model
    head_ratio: float | None = None
    ffn_ratio: float | None = None
    min_keep: float = 0.1  # fraction of every layer's KV groups and of its channels that stays (≥ 1 unit)

    @property
    def apart(self) -> bool:
        return self.head_ratio is not None or self.ffn_ratio is not None


def max_removable(units: int, min_keep: float) -> int:
    """Units a module may lose: at least `min_keep` of them and at least one stay."""
    return max(0, min(units - 1, int(math.floor((1.0 - min_keep) * units + 1e-9))))


class GroupBudget:
    """Genome = KV groups removed per layer, then FFN channels removed per layer. Modules form budget groups (one
    group of all modules, or heads and FFN apart); every group must remove at least its budget. A move is one KV
    group or one FFN step (1/`ffn_levels` of the width)."""

    def __init__(self, n_kv: Sequence[int], n_ffn: Sequence[int], head_cost: Sequence[int], ffn_cost: Sequence[int],
                 spec: BudgetSpec, params_before: int, layer_params: int, ffn_levels: int = 40):
        if not 0.0 <= spec.min_keep < 1.0:
            raise SlimGPTError(f"the per-layer minimum kept must be in [0, 1), got {spec.min_keep}")
        if spec.scope not in SCOPES:
            raise SlimGPTError(f"the budget's scope must be one of {', '.join(SCOPES)}, got {spec.scope!r}")
        n = self.n = len(n_kv)
        self.units = np.array(list(n_kv) + list(n_ffn), dtype=np.int64)
        self.cost = np.array(list(head_cost) + list(ffn_cost), dtype=np.int64)
        self.step = np.array([1] * n + [max(1, math.ceil(f / ffn_levels)) for f in n_ffn], dtype=np.int64)
        self.maximum = np.array([max_removable(int(u), spec.min_keep) for u in self.units], dtype=np.int64)
        self.params_before = params_before
        heads, ffn = list(range(n)), list(range(n, 2 * n))
        if spec.apart:
            head_r = spec.head_ratio if spec.head_ratio is not None else 0.0
            ffn_r = spec.ffn_ratio if spec.ffn_ratio is not None else 0.0
            for name, r in (("head ratio", head_r), ("FFN ratio", ffn_r)):
                if not 0.0 <= r < 1.0:
                    raise SlimGPTError(f"the {name} must be in [0, 1), got {r}")
            self.groups = [(heads, int(round(head_r * self._all(heads)))), (ffn, int(round(ffn_r * self._all(ffn))))]
        else:
            if spec.target_params is not None:
                remove = params_before - int(spec.target_params)
                if not 0 < int(spec.target_params) < params_before:
                    raise SlimGPTError(f"target of {int(spec.target_params):,} parameters must be between 1 and the "
                                       f"model's {params_before:,}")
            else:
                if not 0.0 <= spec.ratio < 1.0:
                    raise SlimGPTError(f"the ratio must be in [0, 1), got {spec.ratio}")
                remove = int(round(spec.ratio * (layer_params if spec.scope == "layers" else params_before)))
            self.groups = [(heads + ffn, remove)]
        for modules, remove in self.groups:
            most = int(self.maximum[modules] @ self.cost[modules])
            if most < remove:
                raise SlimGPTError(f"cannot remove {remove:,} parameters while every layer keeps {spec.min_keep:.0%} "
                                   f"of its heads and channels (at most {most:,}): lower the minimum or the target")

    def _all(self, modules) -> int:
        return int(self.units[modules] @ self.cost[modules])

    @property
    def remove(self) -> int:
        return sum(r for _, r in self.groups)

    def removed(self, g: np.ndarray, modules=None) -> int:
        modules = slice(None) if modules is None else modules
        return int(g[modules] @ self.cost[modules])

    def moved(self, g: np.ndarray, m: int, direction: int) -> int:
        return int(min(max(g[m] + direction * self.step[m], 0), self.maximum[m]))

    def repair(self, g: np.ndarray, rng: np.random.Generator, frozen: Sequence[int] = ()) -> np.ndarray:
        """Per group: raise random modules until its budget is met, then lower random modules (not `frozen`) while
        it stays met. Each group then removes at least its budget and less than its budget plus one move."""
        g = g.copy()
        for modules, remove in self.groups:
            r = self.removed(g, modules)
            while r < remove:
                m = int(rng.choice([m for m in modules if g[m] < self.maximum[m]]))
                v = self.moved(g, m, 1)
                r += (v - int(g[m])) * int(self.cost[m])
                g[m] = v
            while True:
                down = [m for m in modules if g[m] > 0 and m not in frozen
                        and r - (int(g[m]) - self.moved(g, m, -1)) * int(self.cost[m]) >= remove]
                if not down:
                    break
                m = int(rng.choice(down))
                v = self.moved(g, m, -1)
                r -= (int(g[m]) - v) * int(self.cost[m])
                g[m] = v
        return g

    def mutate(self, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Raise one or two modules by one move, then repair without lowering them (and, where only they could
        go down, with them: a group of few modules may otherwise stay more than one move over its budget)."""
        g = g.copy()
        raised = []
        for _ in range(int(rng.integers(1, 3))):
            up = [m for m in range(2 * self.n) if g[m] < self.maximum[m]]
            if not up:
                break
            m = int(rng.choice(up))
            g[m] = self.moved(g, m, 1)
            raised.append(m)
        return self.repair(self.repair(g, rng, frozen=raised), rng)

    def exact(self, g: np.ndarray) -> np.ndarray:
        """FFN channels given back one at a time (most-pruned layers first) so every group holding FFN modules
        removes less than its budget plus one channel's parameters (a heads-only group stays within one KV group)."""
        g = g.copy()
        for modules, remove in self.groups:
            excess = self.removed(g, modules) - remove
            for m in sorted((m for m in modules if m >= self.n), key=lambda m: (-int(g[m]), m)):
                give = min(excess // int(self.cost[m]), int(g[m]))
                g[m] -= give
                excess -= give * int(self.cost[m])
        return g

    def meets(self, g: np.ndarray) -> bool:
        return all(self.removed(g, modules) >= remove for modules, remove in self.groups) and bool(
            np.all(g <= self.maximum)) and bool(np.all(g >= 0))


# --- the allocation -----------------------------------------------------------------------------------------

def lower_hull(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of points with ascending x (monotone chain)."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord from a to i: drop it
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def module_costs(curves: ModelCurves, budget: GroupBudget, sensitivity: Sequence[float],
                 balance: float = 1.0) -> list[tuple[list[int], list[float]]]:
    """Per module (heads of every layer, then FFN of every layer): the unit counts the allocation may stop at
    (0, every move, the maximum) and the comparable cost at each: weight × sensitivity × predicted output error
    (relative error × the module's output energy tr(W H Wᵀ))."""
    out = []
    n = budget.n
    for m in range(2 * n):
        lc = curves.layers[m % n]
        top, step = int(budget.maximum[m]), int(budget.step[m])
        counts = sorted(set(range(0, top + 1, step)) | {top})
        if m < n:
            errors = [balance * sensitivity[m] * lc.attn_energy * lc.head_error(k) for k in counts]
        else:
            errors = [sensitivity[m] * lc.mlp_energy * lc.ffn_error(c) for c in counts]
        out.append((counts, errors))
    return out


def allocate(curves: ModelCurves, budget: GroupBudget, sensitivity: Sequence[float], balance: float = 1.0) -> np.ndarray:
    """Units removed per module (a genome at the search's moves) meeting every group's budget: hull segments in
    order of cost per parameter removed, each group until its budget is met."""
    costs = module_costs(curves, budget, sensitivity, balance)
    g = np.zeros(2 * budget.n, dtype=np.int64)
    for modules, remove in budget.groups:
        segments = []  # (cost per parameter, module, count at the segment's end)
        for m in modules:
            counts, errors = costs[m]
            params = [c * int(budget.cost[m]) for c in counts]
            hull = lower_hull(params, errors)
            for a, b in zip(hull, hull[1:]):
                segments.append(((errors[b] - errors[a]) / (params[b] - params[a]), m, counts[b]))
        segments.sort(key=lambda s: (s[0], s[1], s[2]))  # within a module slopes ascend: its segments stay in order
        removed = 0
        for _, m, end in segments:
            if removed >= remove:
                break
            need = remove - removed
            gain = (end - int(g[m])) * int(budget.cost[m])
            if gain > need and m >= budget.n:  # an FFN segment: only as many moves as the budget still needs
                moves = math.ceil(need / (int(budget.step[m]) * int(budget.cost[m])))
                end = min(int(g[m]) + moves * int(budget.step[m]), int(budget.maximum[m]))
                gain = (end - int(g[m])) * int(budget.cost[m])
            g[m] = end
            removed += gain
    return g


def fitted_schedule(budget: GroupBudget, n_kv: Sequence[int], n_ffn: Sequence[int], kind: str, shape: float,
                    head_share: float | None = None) -> np.ndarray:
    """A fixed schedule (log, linear, uniform) fitted to the budget: the heads at `head_share` × the layers' share
    of the budget (None: the same mean ratio as the FFN; apart: the head budget's own ratio), the FFN's mean ratio
    raised by bisection until every group is met, at the search's FFN moves."""
    n = budget.n

    def genome(head_mean: float, ffn_mean: float) -> np.ndarray:
        heads = layer_ratios(n, head_mean, kind, shape)
        ffn = layer_ratios(n, ffn_mean, kind, shape)
        g = [min(units_to_remove(k, r), int(budget.maximum[i])) for i, (k, r) in enumerate(zip(n_kv, heads))]
        for i, (f, r) in enumerate(zip(n_ffn, ffn)):
            m, step = n + i, int(budget.step[n + i])
            g.append(min(math.ceil(units_to_remove(f, r) / step) * step, int(budget.maximum[m])))
        return np.array(g, dtype=np.int64)

    def feasible(mean: float) -> bool:
        try:
            layer_ratios(n, mean, kind, shape)
            return True
        except SlimGPTError:
            return False

    def raise_until(met, make) -> float:
        lo, hi = 0.0, 0.95
        while not feasible(hi) and hi > 1e-6:
            hi *= 0.95
        for _ in range(40):
            mid = (lo + hi) / 2
            if not feasible(mid) or met(make(mid)):
                hi = mid
            else:
                lo = mid
        return hi

    share = budget.remove / max(1, budget._all(list(range(2 * n))))
    if len(budget.groups) == 2:  # apart: each kind to its own budget
        (hm, hr), (fm, fr) = budget.groups
        head_mean = raise_until(lambda g: budget.removed(g, hm) >= hr, lambda t: genome(t, 0.0))
        ffn_mean = raise_until(lambda g: budget.removed(g, fm) >= fr, lambda t: genome(0.0, t))
        g = genome(head_mean, ffn_mean)
    else:
        head_mean = min(0.95, share * head_share) if head_share is not None else None
        if head_mean is not None and not feasible(head_mean):
            head_mean = 0.0
        ffn_mean = raise_until(budget.meets, lambda t: genome(t if head_mean is None else head_mean, t))
        g = genome(ffn_mean if head_mean is None else head_mean, ffn_mean)
    if not budget.meets(g):  # the ceilings cut the fixed shape: fill the rest deterministically
        g = budget.repair(np.minimum(g, budget.maximum), np.random.default_rng(0))
    return g


# --- the measured sensitivity -------------------------------------------------------------------------------

class OutputFisher(NamedTuple):
    attn: list[torch.Tensor]  # per layer: G of o_proj's output [hidden, hidden] fp64
    mlp: list[torch.Tensor]  # per layer: G of down_proj's output
    dense_logp: list[torch.Tensor]  # per batch: the dense model's next-token log-probabilities [b, T, vocab] fp32


def output_fisher(model, tokens: torch.Tensor, batch_size: int = 8, seed: int = 0) -> OutputFisher:
    """G = Σ g gᵀ / tokens of every o_proj and down_proj output, g the gradient of the log-likelihood of next
    tokens sampled from the model's own distribution (the Fisher, the Hessian of KL(dense ‖ ·) at the dense
    model), one forward and backward per batch. fp64 sums. The forward's log-probabilities come with it, so the
    KL's dense side needs no forward of its own."""
    layers = model.model.layers
    hidden = model.config.hidden_size
    dev = next(model.parameters()).device
    G_attn = [torch.zeros(hidden, hidden, dtype=torch.float64, device=dev) for _ in layers]
    G_mlp = [torch.zeros(hidden, hidden, dtype=torch.float64, device=dev) for _ in layers]
    count = 0
    dense_logp = []

    def catcher(target: torch.Tensor):
        def on_grad(grad: torch.Tensor):
            g = grad.reshape(-1, grad.shape[-1]).double()
            target.addmm_(g.T, g)
        return on_grad

    def forward_hook(target):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(catcher(target))
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(forward_hook(G_attn[i])))
        handles.append(layer.mlp.down_proj.register_forward_hook(forward_hook(G_mlp[i])))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        for s in range(0, tokens.shape[0], batch_size):
            ids = tokens[s:s + batch_size].to(dev)
            with torch.enable_grad():
                x = embed(ids).detach().requires_grad_(True)
                every = model(inputs_embeds=x, use_cache=False).logits.float()
                dense_logp.append(torch.log_softmax(every.detach(), dim=-1))
                logits = every[:, :-1]
                probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).cpu()
                labels = torch.multinomial(probs, 1, generator=generator).flatten().to(dev)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels,
                                                         reduction="sum")
                loss.backward()
            count += labels.numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return OutputFisher([G / count for G in G_attn], [G / count for G in G_mlp], dense_logp)


def directional_sensitivity(G: torch.Tensor, W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """How much of the Fisher G [d, d] of a module's output the OBS removal of input columns `cols` meets:
    tr(G ΔW H ΔWᵀ) / tr(ΔW H ΔWᵀ), ΔW the removal's change of W [d, in], H the damped Hessian that Hinv [in, in]
    inverts. Closed form, no variant built: ΔW H ΔWᵀ = W_Q (H⁻¹_QQ)⁻¹ W_Qᵀ = ZᵀZ with Z = L⁻¹ W_Qᵀ [q, d], L the
    lower Cholesky factor of H⁻¹_QQ. tr(G)/d when nothing is removed. fp64."""
    mean_diagonal = float(torch.trace(G)) / G.shape[0]
    if cols.numel() == 0:
        return mean_diagonal
    L = torch.linalg.cholesky(Hinv[cols][:, cols].double())
    Z = torch.linalg.solve_triangular(L, W[:, cols].T.double(), upper=False)
    denominator = float(Z.pow(2).sum())
    if denominator <= 0.0:
        return mean_diagonal
    return float(((Z @ G.double().to(Z.device)) * Z).sum()) / denominator


def probe_level(units: int, maximum: int, fraction: float, step: int = 1) -> int:
    """The unit count a module's sensitivity is probed at: the budget's mean fraction, at least one move."""
    k = max(step, int(round(fraction * units / step)) * step)
    return max(0, min(k, maximum))
