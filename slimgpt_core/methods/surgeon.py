"""LLM Surgeon (van der Ouderaa et al., ICLR 2024; SPEC §8) and K-OBD: the multi-shot driver.

Every shot: KFAC curvature of every decoder linear from full-model forward+backward passes (curvature.py),
the cost of every unit of every layer (kfac.py), one global threshold filling the shot's parameter budget,
then the correlated updates (LLM Surgeon) or plain removal (K-OBD). Sparsity rises linearly: after shot t
of T, t·α/T of the decoder-layer parameters are gone.

Units:
- heads (default; an adaptation for a physically smaller model): a KV group costs its q/k/v row sets plus its
  o_proj column set, an FFN channel its gate and up rows plus its down_proj column (costs add under
  block-diagonal KFAC). Rows are compensated in q/k/v/gate/up, columns in o_proj/down_proj, and the layers are
  sliced (base/shapes.py). Every layer keeps at least one KV group and one FFN channel.
- rows (the paper's own units): every row and column of every matrix; removed ones become zeros and the model
  keeps its shape: it is NOT smaller. Already-dead rows/columns count as removed at cost 0.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from slimgpt_core.base import devices
from slimgpt_core.base.cache import forget_fingerprint
from slimgpt_core.base.devices import peak_memory_mb, resolve_device
from slimgpt_core.base.errors import JobCancelled, SlimGPTError, out_of_memory_message
from slimgpt_core.base.events import Callback, LayerDone, Progress, RunReport, ShotDone
from slimgpt_core.base.shapes import (count_parameters, has_fused_projections, keep_channels, keep_kv_groups,
                                      layer_shape, unit_parameters, update_config)
from slimgpt_core.methods import kfac
from slimgpt_core.methods.curvature import CurvatureCollector, factor_bytes, linears
from slimgpt_core.methods.prune_settings import plan_removals
from slimgpt_core.methods.settings import PruneSettings
from slimgpt_core.methods.surgeon_lora import lora_steps
from slimgpt_core.schedules.schedule import check_ratio

def validate(settings: PruneSettings) -> None:
    check_ratio(settings.ratio)
    settings.surgeon.validate()
    if not settings.damp > 0:
        raise SlimGPTError(f"KFAC damping must be > 0, got {settings.damp}")


def check_separate_projections(model) -> None:
    """The KFAC factors and the weight updates are per projection (q, k, v, gate, up): refuse a model that fuses
    them (Phi-3) before any forward pass."""
    if any(has_fused_projections(layer) for layer in model.model.layers):
        raise SlimGPTError(f"LLM Surgeon and K-OBD need separate q/k/v and gate/up projections, which "
                           f"{model.config.model_type} fuses (qkv_proj, gate_up_proj): use slimgpt, wanda-sp, "
                           "magnitude or minitron for it")


def heldout_split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(curvature samples, held-out samples): the last ⌊N/8⌋ sequences (at least one when N ≥ 2) are held out
    for the loss recorded after every shot."""
    n = tokens.shape[0]
    held = max(1, n // 8) if n >= 2 else 0
    return tokens[:n - held], tokens[n - held:]


def mean_loss(model, tokens: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of `tokens` [N, S]."""
    dev = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            ids = tokens[s:s + batch_size].to(dev)
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    return total / max(count, 1)


def check_memory(model, batch_size: int, seqlen: int, device: torch.device) -> torch.device:
    """Where the factors live: on `device` when factors plus one forward+backward fit, else on the CPU (CUDA);
    refuse with what to lower when even that cannot fit."""

    need_factors = factor_bytes(model)
    cfg = model.config
    # logits, their softmax and gradient, plus ~24 hidden-sized activations per layer kept for the backward
    need_acts = 4 * batch_size * seqlen * (3 * cfg.vocab_size + 24 * cfg.hidden_size * cfg.num_hidden_layers
                                           + 4 * getattr(cfg, "intermediate_size", cfg.hidden_size)
                                           * cfg.num_hidden_layers)
    if devices.fits_in_memory(need_factors + need_acts, device):
        return device
    if device.type == "cuda" and devices.fits_in_memory(need_factors, torch.device("cpu"), below=True):
        return torch.device("cpu")
    have = devices.available_memory_bytes(device)
    raise SlimGPTError(
        f"LLM Surgeon needs {need_factors / 2**30:.2f} GiB for the KFAC factors (fixed by the model) and about "
        f"{need_acts / 2**30:.2f} GiB for a forward+backward of --batch-size {batch_size} × {seqlen} tokens, but "
        f"{device} has {(have or 0) / 2**30:.2f} GiB free: lower --batch-size or --seqlen, or use a machine with "
        "more memory")


@dataclass
class _Unit:
    cost: float
    layer: int
    kind: str  # "kv" | "ffn"
    index: int
    params: int


def _inverses(A: dict, G: dict, damp: float, a_inv=None, g_inv=None):
    """Damped factors and the fp64 inverses of those named in `a_inv`/`g_inv` (all when None) for one layer:
    the inverses are most of a shot's cost phase, so only the needed ones are computed."""
    A_d = {n: kfac.damped(a, damp) for n, a in A.items()}
    G_d = {n: kfac.damped(g, damp) for n, g in G.items()}
    return (A_d, {n: kfac.inverse(A_d[n]) for n in (A_d if a_inv is None else a_inv)},
            G_d, {n: kfac.inverse(G_d[n]) for n in (G_d if g_inv is None else g_inv)})


def _input_of(name: str) -> str:
    return {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(name, name)


def _head_unit_costs(layer, A_d, A_inv, G_d, G_inv, rows_dead: bool = False,
                     drop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cost of every KV group and every FFN channel of one layer. With `rows_dead` only the o_proj/down_proj
    column set counts: once those columns go, no gradient reaches the unit's q/k/v/gate/up rows, which are then
    removed at cost 0 (the authors' rule for dead rows). Otherwise the sum of set costs over coupled matrices.
    `drop` (K-OBD): the loss of zeroing with nothing compensated, from the factors A_d, G_d as given."""
    lin = linears(layer)
    attn = layer.self_attn
    d, rep = attn.head_dim, attn.num_key_value_groups
    w = {n: m.weight.data for n, m in lin.items()}
    if drop:
        o_cost = kfac.column_drop_costs(w["o_proj"], G_d["o_proj"], A_d["o_proj"], rep * d)
        down_cost = kfac.column_drop_costs(w["down_proj"], G_d["down_proj"], A_d["down_proj"])
        if rows_dead:
            return o_cost, down_cost
        q_a = A_d["q_proj"]
        return (o_cost + kfac.row_drop_costs(w["q_proj"], q_a, G_d["q_proj"], rep * d)
                + kfac.row_drop_costs(w["k_proj"], q_a, G_d["k_proj"], d)
                + kfac.row_drop_costs(w["v_proj"], q_a, G_d["v_proj"], d),
                down_cost + kfac.row_drop_costs(w["gate_proj"], A_d["gate_proj"], G_d["gate_proj"])
                + kfac.row_drop_costs(w["up_proj"], A_d["gate_proj"], G_d["up_proj"]))
    if rows_dead:
        return (kfac.column_unit_costs(w["o_proj"], G_d["o_proj"], A_inv["o_proj"], rep * d),
                kfac.column_unit_costs(w["down_proj"], G_d["down_proj"], A_inv["down_proj"]))
    kv = (kfac.row_unit_costs(w["q_proj"], A_d["q_proj"], G_inv["q_proj"], rep * d)
          + kfac.row_unit_costs(w["k_proj"], A_d["q_proj"], G_inv["k_proj"], d)
          + kfac.row_unit_costs(w["v_proj"], A_d["q_proj"], G_inv["v_proj"], d)
          + kfac.column_unit_costs(w["o_proj"], G_d["o_proj"], A_inv["o_proj"], rep * d))
    ffn = (kfac.row_unit_costs(w["gate_proj"], A_d["gate_proj"], G_inv["gate_proj"])
           + kfac.row_unit_costs(w["up_proj"], A_d["gate_proj"], G_inv["up_proj"])
           + kfac.column_unit_costs(w["down_proj"], G_d["down_proj"], A_inv["down_proj"]))
    return kv, ffn


def schedule_fraction(model, settings) -> float:
    """The fraction of decoder-layer parameters a per-layer schedule (settings as for SlimGPT) removes: the
    budget that makes LLM Surgeon's global allocation comparable at equal achieved ratio."""

    _, _, head_rm, ffn_rm = plan_removals(model, settings)
    units = [unit_parameters(layer) for layer in model.model.layers]
    removed = sum(h * u.per_kv_group + c * u.per_channel for u, h, c in zip(units, head_rm, ffn_rm))
    return removed / count_parameters(model.model.layers)


def select_heads(units: list[_Unit], budget: int, alive_kv: list[int], alive_ffn: list[int]) -> list[_Unit]:
    """The cheapest units over all layers until `budget` parameters are removed (one global threshold),
    never the last KV group or FFN channel of a layer."""
    chosen, removed = [], 0
    alive = {"kv": list(alive_kv), "ffn": list(alive_ffn)}
    for u in sorted(units, key=lambda u: u.cost):
        if removed >= budget:
            break
        if alive[u.kind][u.layer] <= 1:
            continue
        alive[u.kind][u.layer] -= 1
        chosen.append(u)
        removed += u.params
    return chosen


def rows_threshold(costs: list[tuple[torch.Tensor, torch.Tensor]], budget: int) -> float:
    """Smallest global threshold τ on raw cost whose rows (cost ≤ τ) and columns remove at least `budget`
    weights: k_r rows and k_c columns of an R×C matrix remove k_r·C + k_c·R − k_r·k_c."""
    sorted_costs = [(r.sort().values, c.sort().values) for r, c in costs]

    def removed(tau: float) -> int:
        total = 0
        for r, c in sorted_costs:
            kr = int(torch.searchsorted(r, tau, right=True))
            kc = int(torch.searchsorted(c, tau, right=True))
            total += kr * len(c) + kc * len(r) - kr * kc
        return total
    candidates = torch.cat([torch.cat([r, c]) for r, c in sorted_costs]).unique()  # sorted
    lo, hi = 0, len(candidates) - 1
    if budget <= 0:
        return -math.inf
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(float(candidates[mid])) >= budget:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def _rows_mode_costs(w: torch.Tensor, A_d, A_inv, G_d, G_inv, A_raw, G_raw,
                     drop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-row and single-column costs of one matrix (`drop`: K-OBD's, nothing compensated); dead
    rows/columns (zero weights or zero curvature diagonal) cost 0."""
    if drop:
        rc, cc = kfac.row_drop_costs(w, A_raw, G_raw), kfac.column_drop_costs(w, G_raw, A_raw)
    else:
        rc, cc = kfac.row_unit_costs(w, A_d, G_inv), kfac.column_unit_costs(w, G_d, A_inv)
    dead_r = (w == 0).all(1).to(rc.device) | (G_raw.diagonal() == 0).to(rc.device)
    dead_c = (w == 0).all(0).to(cc.device) | (A_raw.diagonal() == 0).to(cc.device)
    return rc.masked_fill(dead_r, 0.0), cc.masked_fill(dead_c, 0.0)


def zero_fraction(layers) -> float:
    """Fraction of decoder-layer parameters that are exactly zero."""
    total = count_parameters(layers)
    zeros = sum(int((p == 0).sum()) for p in {id(p): p for p in layers.parameters()}.values())
    return zeros / total


class _SurgeonRun:
    """What the shots of one LLM Surgeon run share: the model, its calibration and held-out tokens, where the factors
    live, the budget's base, and the events (added to the report and sent to the callback, with an ETA)."""

    def __init__(self, model, settings, calib: torch.Tensor, heldout: torch.Tensor, device: torch.device,
                 factor_device: torch.device, report: RunReport, callback: Callback | None,
                 should_stop: Callable[[], bool] | None):
        self.model, self.settings, self.calib, self.heldout = model, settings, calib, heldout
        self.device, self.factor_device, self.report = device, factor_device, report
        self.callback, self.should_stop = callback, should_stop
        self.heads_mode = settings.surgeon.surgeon_units == "heads"
        self.compensate = settings.method != "kobd"
        self.layer_params0 = count_parameters(model.model.layers)
        self.n_batches = (calib.shape[0] + settings.batch_size - 1) // settings.batch_size
        self.t_start = time.perf_counter()

    def emit(self, event) -> None:
        self.report.add(event)
        if self.callback is not None:
            self.callback(event)

    def eta(self, done_fraction: float) -> float:
        elapsed = time.perf_counter() - self.t_start
        return elapsed * (1 / done_fraction - 1) if done_fraction > 0 else float("nan")

    def stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobCancelled()

    def note(self, t: int, what: str) -> None:
        T = self.settings.surgeon.shots
        self.emit(Progress(t - 1, T, f"shot {t}/{T} {what}", time.perf_counter() - self.t_start))

    def held_out_loss(self) -> float:
        return mean_loss(self.model, self.heldout if self.heldout.shape[0] else self.calib, self.settings.batch_size)

    def shot_done(self, t: int, loss: float, shapes, removed: float, seconds: float, eta: float,
                  peak: float) -> ShotDone:
        T, ratio = self.settings.surgeon.shots, self.settings.ratio
        return ShotDone(t, T, t * ratio / T, removed, loss, math.exp(loss), [s[0] for s in shapes],
                        [s[2] for s in shapes], seconds, eta, peak)

    def shot(self, t: int) -> None:
        """Shot t of T: curvature, pruning to t/T of the budget (and LoRA steps), the held-out loss."""
        model, settings, device = self.model, self.settings, self.device
        own, T = settings.surgeon, settings.surgeon.shots
        layers = model.model.layers
        self.stop()
        t_shot = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def progress(b: int, nb: int) -> None:
            self.note(t, f"curvature {b}/{nb} · ETA {_fmt(self.eta(((t - 1) + b / nb) / T))}")
        self.note(t, f"curvature 0/{self.n_batches}")
        collector = CurvatureCollector(model, self.factor_device, own.kfac_positions, seed=t)
        A, G = collector.run(self.calib, settings.batch_size, own.fisher, self.should_stop, progress)
        del collector
        self.stop()  # the last moment to cancel this shot: nothing has been changed in it yet
        self.note(t, "prune")
        budget = round(t * settings.ratio / T * self.layer_params0)
        if self.heads_mode:
            _heads_shot(model, A, G, settings.damp, budget - (self.layer_params0 - count_parameters(layers)),
                        self.compensate, own.surgeon_update)
        else:
            _rows_shot(model, A, G, settings.damp, budget, self.compensate, own.surgeon_update != "columns")
        del A, G
        if own.surgeon_lora_steps:
            self.note(t, f"LoRA {own.surgeon_lora_steps} steps")
            lora_steps(model, self.calib, own.surgeon_lora_steps, settings.batch_size, device, t,
                       self.should_stop)
        removed = _removed_fraction(layers, self.heads_mode, self.layer_params0)
        self.note(t, "held-out loss")
        loss = self.held_out_loss()
        self.emit(self.shot_done(t, loss, [layer_shape(layer) for layer in layers], removed,
                                 time.perf_counter() - t_shot, self.eta(t / T), _peak_mb(device)))


def prune_surgeon(model, tokens: torch.Tensor, settings, callback: Callback | None = None,
                  should_stop: Callable[[], bool] | None = None, model_name: str = "") -> RunReport:
    """LLM Surgeon (settings.method == "surgeon") or K-OBD ("kobd") in `settings.surgeon.shots` shots to
    settings.ratio of the decoder-layer parameters; prunes `model` in place and returns the report."""

    validate(settings)
    check_separate_projections(model)
    device = resolve_device(settings.device)
    layers = model.model.layers
    T = settings.surgeon.shots
    calib, heldout = heldout_split(tokens)
    if calib.shape[0] == 0:
        raise SlimGPTError("LLM Surgeon needs at least 2 calibration sequences (one is held out)")
    home = next(model.parameters()).device
    factor_device = check_memory(model, settings.batch_size, tokens.shape[1], device)
    report = RunReport(model_name, settings.record(), [], [], count_parameters(model), 0, count_parameters(layers),
                         0, device=str(device))
    report.settings.update(heldout_samples=int(heldout.shape[0]), factor_device=str(factor_device),
                           factor_gib=factor_bytes(model) / 2**30)
    shapes0 = [layer_shape(layer) for layer in layers]
    run = _SurgeonRun(model, settings, calib, heldout, device, factor_device, report, callback, should_stop)
    try:
        model.to(device)
        model.eval()
        dense_loss = run.held_out_loss()
        run.emit(ShotDone(0, T, 0.0, 0.0, dense_loss, math.exp(dense_loss), [s[0] for s in shapes0],
                          [s[2] for s in shapes0], 0.0, 0.0, 0.0))
        for t in range(1, T + 1):
            run.shot(t)
    except torch.cuda.OutOfMemoryError:
        raise SlimGPTError(out_of_memory_message("pruning", str(device))) from None
    finally:
        model.to(home)
    _finish(model, report, shapes0, run.heads_mode, model_name, run.emit, device)
    report.total_seconds = time.perf_counter() - run.t_start
    report.phase_seconds = {"shots": report.total_seconds}
    run.emit(Progress(T - 1, T, "done", report.total_seconds))
    return report


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _peak_mb(device: torch.device) -> float:
    return peak_memory_mb(device)


def _removed_fraction(layers, heads_mode: bool, layer_params0: int) -> float:
    if heads_mode:
        return 1 - count_parameters(layers) / layer_params0
    return zero_fraction(layers)


def _heads_shot(model, A, G, damp: float, budget: int, compensate: bool, update: str = "dead-rows") -> None:
    """Score every KV group and FFN channel, pick globally, update and slice the layers. `update`: dead-rows
    (column cost and column update only), both (summed costs, row and column updates), columns (summed costs,
    column updates)."""
    rows_dead, update_rows = update == "dead-rows", update == "both"
    layers = model.model.layers
    # heads mode inverts A of o_proj/down_proj only, and G of the row-side matrices unless their rows are dead
    needed = dict(a_inv=("o_proj", "down_proj") if compensate else (),
                  g_inv=() if rows_dead or not compensate else ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    kept = []  # dead-rows: the two A inverses per layer are kept for the updates (SmolLM2: ≈ 0.65 GB fp64)
    units, alive_kv, alive_ffn = [], [], []
    for i, layer in enumerate(layers):
        A_d, A_inv, G_d, G_inv = _inverses(A[i], G[i], damp, **needed)
        kept.append((A_inv, G_inv) if rows_dead else None)
        if compensate:
            kv_cost, ffn_cost = _head_unit_costs(layer, A_d, A_inv, G_d, G_inv, rows_dead)
        else:  # K-OBD ranks by what zeroing costs with nothing compensated (undamped factors, as the authors)
            kv_cost, ffn_cost = _head_unit_costs(layer, A[i], None, G[i], None, rows_dead, drop=True)
        params = unit_parameters(layer)
        units += [_Unit(float(c), i, "kv", u, params.per_kv_group) for u, c in enumerate(kv_cost.tolist())]
        units += [_Unit(float(c), i, "ffn", u, params.per_channel) for u, c in enumerate(ffn_cost.tolist())]
        alive_kv.append(len(kv_cost))
        alive_ffn.append(len(ffn_cost))
    chosen = select_heads(units, budget, alive_kv, alive_ffn)
    for i, layer in enumerate(layers):
        kv_units = sorted(u.index for u in chosen if u.layer == i and u.kind == "kv")
        channels = sorted(u.index for u in chosen if u.layer == i and u.kind == "ffn")
        if not kv_units and not channels:
            continue
        A_inv, G_inv = kept[i] or _inverses(A[i], G[i], damp, **needed)[1::2]
        lin = linears(layer)
        attn = layer.self_attn
        d, rep = attn.head_dim, attn.num_key_value_groups
        dev = lin["q_proj"].weight.device
        q_rows = _rows_of(kv_units, rep * d, dev)
        kv_rows = _rows_of(kv_units, d, dev)
        ch = torch.tensor(channels, dtype=torch.long, device=dev)
        none = torch.zeros(0, dtype=torch.long, device=dev)
        plan = {"q_proj": (q_rows, none), "k_proj": (kv_rows, none), "v_proj": (kv_rows, none),
                "o_proj": (none, q_rows), "gate_proj": (ch, none), "up_proj": (ch, none), "down_proj": (none, ch)}
        for name, (rows, cols) in plan.items():
            if len(rows) or len(cols):
                _write(lin[name], kfac.remove(lin[name].weight.data, rows, cols, G_inv.get(name),
                                              A_inv.get(_input_of(name)), compensate, update_rows))
        if kv_units:
            keep_kv_groups(layer, sorted(set(range(alive_kv[i])) - set(kv_units)))
        if channels:
            keep_channels(layer, sorted(set(range(alive_ffn[i])) - set(channels)))
    update_config(model)


def _rows_shot(model, A, G, damp: float, budget: int, compensate: bool, update_rows: bool = True) -> None:
    """Score every row and column of every matrix, one global threshold, update in place (zeros)."""
    layers = model.model.layers
    needed = {} if compensate else dict(a_inv=(), g_inv=())  # K-OBD needs no inverse
    costs = []
    for i, layer in enumerate(layers):
        A_d, A_inv, G_d, G_inv = _inverses(A[i], G[i], damp, **needed)
        for name, m in linears(layer).items():
            a = _input_of(name)
            costs.append(_rows_mode_costs(m.weight.data, A_d[a], A_inv.get(a), G_d[name], G_inv.get(name), A[i][a],
                                          G[i][name], drop=not compensate))
    tau = rows_threshold(costs, budget)
    k = 0
    for i, layer in enumerate(layers):
        _, A_inv, _, G_inv = _inverses(A[i], G[i], damp, **needed)
        for name, m in linears(layer).items():
            rc, cc = costs[k]
            k += 1
            rows = (rc <= tau).nonzero().flatten().to(m.weight.device)
            cols = (cc <= tau).nonzero().flatten().to(m.weight.device)
            if len(rows) or len(cols):
                _write(m, kfac.remove(m.weight.data, rows, cols, G_inv.get(name), A_inv.get(_input_of(name)),
                                      compensate, update_rows))


def _rows_of(units, size: int, device) -> torch.Tensor:
    if not units:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(u * size, (u + 1) * size, device=device) for u in units])


def _write(linear: torch.nn.Linear, weight: torch.Tensor) -> None:
    linear.weight.data = weight.to(device=linear.weight.device, dtype=linear.weight.dtype)


def _finish(model, report: RunReport, shapes0, heads_mode: bool, model_name: str, emit, device) -> None:
    """Per-layer ratios and shapes, parameter counts, the config note."""

    layers = model.model.layers
    for i, (layer, (q0, kv0, f0)) in enumerate(zip(layers, shapes0)):
        q, kv, f = layer_shape(layer)
        if heads_mode:
            report.head_ratios.append(1 - kv / kv0)
            report.ffn_ratios.append(1 - f / f0)
        else:  # fractions of zero weights in attention and MLP
            report.head_ratios.append(zero_fraction(layer.self_attn))
            report.ffn_ratios.append(zero_fraction(layer.mlp))
        emit(LayerDone(i, q, kv, f, float("nan"), 0.0, _peak_mb(device)))
    forget_fingerprint(model)
    report.params_after = count_parameters(model)
    report.layer_params_after = count_parameters(layers)
    report.peak_memory_mb = _peak_mb(device)
    model.config.slimgpt = {"source_model": model_name, **report.settings,
                            "head_ratios": report.head_ratios, "ffn_ratios": report.ffn_ratios}
