"""The sequential layer-wise driver (SPEC §2.4): each decoder layer in turn, its forwards, OBS on o_proj and
down_proj, the accumulated error, events. Math lives in obs.py, forwards in forwards.py, settings in
prune_settings.py, memory and activation placement in activations.py, cached dense statistics in statistics.py."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from slimgpt_core.base.cache import forget_fingerprint
from slimgpt_core.base.devices import peak_memory_mb, resolve_device
from slimgpt_core.base.errors import JobCancelled, SlimGPTError, out_of_memory_message
from slimgpt_core.base.events import Callback, FFNScores, HeadImportance, LayerDone, ModuleMeasured, Progress, RunReport
from slimgpt_core.base.modeling_slimgpt import keep_query_heads_of
from slimgpt_core.base.shapes import (count_parameters, head_units, keep_channels, keep_kv_groups, layer_shape,
                                      update_config)
from slimgpt_core.methods import obs, registry
from slimgpt_core.methods.activations import (activation_device, activation_streams, buffer_like,
                                              distributed_rank_world, fits, place, relative_distance, shard_tokens)
from slimgpt_core.methods.forwards import (capture_attention_inputs, capture_layer_inputs, collect_mlp_inputs,
                                           replay_outputs, run_layer)
from slimgpt_core.methods.prune_settings import PruneSettings, plan_removals
from slimgpt_core.methods.statistics import StatisticsCache


def _ffn_summary(layer_idx: int, scores: Sequence[float], n_removed: int, steps: list[int]) -> FFNScores:
    s = torch.tensor(scores, dtype=torch.float64)
    s = s[torch.isfinite(s)].clamp_min(1e-30).log10()
    qs = {f"q{int(q * 100)}": float(torch.quantile(s, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}
    lo, hi = float(s.min()), float(s.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(s, bins=20, min=lo, max=hi)
    edges = torch.linspace(lo, hi, 21)
    return FFNScores(layer_idx, len(scores), n_removed, qs, [int(c) for c in counts], edges.tolist(), steps)


def prune_model(model, tokens: torch.Tensor, settings: PruneSettings, callback: Callback | None = None,
                should_stop: Callable[[], bool] | None = None, model_name: str = "",
                use_cache: bool = True) -> RunReport:
    """Prune `model` in place on calibration `tokens` [N, seqlen] with the registered `settings.method`; return the
    report."""
    method = registry.lookup(settings.method)
    cache = {"use_cache": use_cache} if method.uses_cache else {}
    return method.function()(model, tokens, settings, callback, should_stop, model_name, **cache)


def _prune_multishot(model, tokens, settings, callback, should_stop, model_name, use_cache) -> RunReport:
    """Layer-wise multi-shot OBS (obs-multishot): `shots` passes over the whole model; after shot s each layer
    has lost s/shots of its final target (linear schedule across shots). Every pass re-collects the curvature
    (layer-wise Hessians) from the partially pruned model and updates the remaining weights with OBS. The report's per-layer events
    are the last shot's (measured against the model entering it); parameters and times cover all shots."""
    _, _, head_rm, ffn_rm = plan_removals(model, settings)
    shapes = [layer_shape(layer) for layer in model.model.layers]
    params_before, layer_params_before = count_parameters(model), count_parameters(model.model.layers)
    phases: dict[str, float] = {}
    total = 0.0
    report = None
    shots = settings.surgeon.shots
    for shot in range(1, shots + 1):
        # heads per unit: a KV group, or one query head where one KV head is shared (shapes.head_units)
        keep_heads = [q - round(h * shot / shots) * head_units(q, kv)[1]
                      for (q, kv, _), h in zip(shapes, head_rm)]
        keep_ffn = [f - round(c * shot / shots) for (_, _, f), c in zip(shapes, ffn_rm)]
        shot_settings = replace(settings, method="slimgpt", keep_heads=keep_heads, keep_ffn=keep_ffn)
        report = _prune_pass(model, tokens, shot_settings, callback, should_stop, model_name, use_cache)
        for k, v in report.phase_seconds.items():
            phases[k] = phases.get(k, 0.0) + v
        total += report.total_seconds
    report.settings = settings.record()
    report.head_ratios = [h / head_units(q, kv)[0] for (q, kv, _), h in zip(shapes, head_rm)]
    report.ffn_ratios = [c / f for (_, _, f), c in zip(shapes, ffn_rm)]
    report.params_before, report.layer_params_before = params_before, layer_params_before
    report.phase_seconds, report.total_seconds = phases, total
    model.config.slimgpt = {"source_model": model_name, **settings.record()}
    return report


class _PassEvents:
    """A pass's events, each added to the report and sent to the callback; a phase checks Stop first and adds its
    seconds to the report's `phase_seconds`. `emit`, `phase` and `done` are what a layer step is handed."""

    def __init__(self, report: RunReport, n_layers: int, t_start: float, callback: Callback | None,
                 should_stop: Callable[[], bool] | None):
        self.report, self.n, self.t_start = report, n_layers, t_start
        self.callback, self.should_stop = callback, should_stop

    def emit(self, event) -> None:
        self.report.add(event)
        if self.callback is not None:
            self.callback(event)

    def phase(self, layer_idx: int, name: str) -> float:
        if self.should_stop is not None and self.should_stop():
            raise JobCancelled()
        self.emit(Progress(layer_idx, self.n, name, time.perf_counter() - self.t_start))
        return time.perf_counter()

    def done(self, name: str, t0: float) -> None:
        phase_t = self.report.phase_seconds
        phase_t[name] = phase_t.get(name, 0.0) + time.perf_counter() - t0


@contextmanager
def _memory_errors(device: torch.device):
    """Running out of memory (CUDA's error or the CPU allocator's) becomes the one sentence of advice."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise SlimGPTError(out_of_memory_message("pruning", str(device))) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower():
            raise SlimGPTError(out_of_memory_message("pruning", str(device))) from None
        raise


def _run_layers(model, tokens: torch.Tensor, settings: PruneSettings, plan: tuple, events: _PassEvents, stats,
                device: torch.device, act_device: torch.device, streams_kept: tuple[bool, bool],
                layer_step: Callable) -> None:
    """Capture the first layer's inputs, then prune the layers in turn, each on the compute device, swapping each
    kept stream's in/out buffers between layers."""
    layers = model.model.layers
    head_r, ffn_r, head_rm, ffn_rm = plan
    need_dense, need_pruned = streams_kept
    t0 = events.phase(0, "capture")
    x0, kwargs = capture_layer_inputs(model, tokens, settings.batch_size, device)
    x0 = place(x0, act_device)
    # an in/out buffer pair per stream the run keeps
    dense_in = x0 if need_dense else None
    pruned_in = (buffer_like(x0).copy_(x0) if need_dense else x0) if need_pruned else None
    dense_out = buffer_like(x0) if need_dense else None
    pruned_out = buffer_like(x0) if need_pruned else None
    events.done("capture", t0)
    for i in range(len(layers)):
        t_layer = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        home = next(layers[i].parameters()).device
        layer = layers[i].to(device)
        streams = _Streams(dense_in, dense_out, pruned_in, pruned_out, kwargs.layer(i), act_device)
        layer_step(layer, i, streams, settings, (head_r[i], head_rm[i], ffn_r[i], ffn_rm[i]), events.emit,
                   events.phase, events.done, stats)
        acc = relative_distance(pruned_out, dense_out) if need_dense and need_pruned else float("nan")
        layers[i] = layer.to(home)
        q, kv, f = layer_shape(layer)
        events.emit(LayerDone(i, q, kv, f, acc, time.perf_counter() - t_layer, peak_memory_mb(device)))
        if need_dense:
            dense_in, dense_out = dense_out, dense_in
        if need_pruned:
            pruned_in, pruned_out = pruned_out, pruned_in


def _prune_pass(model, tokens: torch.Tensor, settings: PruneSettings, callback: Callback | None = None,
                should_stop: Callable[[], bool] | None = None, model_name: str = "",
                use_cache: bool = True, layer_step: Callable | None = None) -> RunReport:
    """One sequential pass of SlimGPT (or a scoring baseline) over the model.

    The model may live on the CPU: each decoder layer is moved to the compute device in turn. With
    `use_cache`, dense statistics of layers whose inputs are the dense model's are read from / written to
    cache/stats (layer 0 always; every layer with dense inputs). `layer_step` stands in for `_layer_once` (the
    tests pass the previous four-pass implementation, tests/reference_layer.py, to compare against)."""

    device = resolve_device(settings.device)
    head_r, ffn_r, head_rm, ffn_rm = plan_removals(model, settings)
    layers = model.model.layers
    n = len(layers)
    t_start = time.perf_counter()
    report = RunReport(model_name, settings.record(), head_r, ffn_r, count_parameters(model), 0,
                         count_parameters(layers), 0, device=str(device))
    events = _PassEvents(report, n, t_start, callback, should_stop)
    if distributed_rank_world()[1] > 1:
        use_cache = False  # each rank holds a shard: statistics are only whole after the all-reduce
    stats = StatisticsCache(model, tokens, use_cache)
    tokens = shard_tokens(tokens, settings.batch_size)
    need_dense, need_pruned = activation_streams(settings)
    act_device = activation_device(model, tokens, device, settings.offload_activations,
                                   2 * (need_dense + need_pruned) + 1)  # + the kept o_proj inputs
    report.settings["activations_on"] = str(act_device)
    with _memory_errors(device):
        _run_layers(model, tokens, settings, (head_r, ffn_r, head_rm, ffn_rm), events, stats, device, act_device,
                    (need_dense, need_pruned), layer_step or _layer_once)
    forget_fingerprint(model)
    report.reused_statistics = stats.reused
    update_config(model)
    model.config.slimgpt = {"source_model": model_name, **settings.record(), "head_ratios": head_r,
                            "ffn_ratios": ffn_r}
    report.params_after = count_parameters(model)
    report.layer_params_after = count_parameters(layers)
    report.total_seconds = time.perf_counter() - t_start
    report.peak_memory_mb = peak_memory_mb(device)
    events.emit(Progress(n - 1, n, "done", report.total_seconds))
    return report


def _prune_inputs(linear: torch.nn.Linear, H: torch.Tensor, group: int, n_remove: int, settings: PruneSettings,
                  obs_prune: Callable[[torch.Tensor], obs.PruneResult]):
    """Remove `n_remove` units of `group` input columns of `linear` with the configured method; update its
    weight in place. Returns the result and the measured and predicted relative errors."""
    w0 = linear.weight.data.float()
    if settings.method in ("magnitude", "wanda-sp"):
        res = obs.prune_by_score(w0, H, group, n_remove, settings.method)
    else:
        res = obs_prune(w0)
        if not settings.compensate:
            res = obs.without_compensation(w0, H, res, group)
    linear.weight.data = res.weight.to(linear.weight.dtype)
    denom = obs.quadratic_error(w0, H)
    return res, obs.relative_error(w0, res.weight, H, denom), (res.predicted_error / denom if denom else 0.0)


@dataclass
class _Streams:
    """One layer's activation buffers: dense and pruned stream inputs and outputs (None when not kept)."""
    dense_in: torch.Tensor | None
    dense_out: torch.Tensor | None
    pruned_in: torch.Tensor | None
    pruned_out: torch.Tensor | None
    kwargs: dict
    where: torch.device  # where activations (and the inputs kept between passes) live


def _layer_once(layer, i, st: _Streams, settings: PruneSettings, plan, emit, phase, done, stats) -> None:
    """Prune layer i running its attention once on the calibration stream (and once on the dense reference).

    The attention pass keeps o_proj's inputs; after head pruning the MLP statistics are the layer replayed from
    the kept heads' columns with the updated o_proj, and so are the outputs, from down_proj's inputs and the
    attention's outputs kept by that pass as far as they fit in memory (else the pruned MLP and o_proj run again).
    When the calibration stream is the dense one (layer 0, dense-input runs) the dense reference pass is the
    attention pass."""
    head_ratio, head_rm, ffn_ratio, ffn_rm = plan
    bs, tf32 = settings.batch_size, settings.tf32
    calib_in = st.pruned_in if settings.sequential else st.dense_in
    dense = i == 0 or not settings.sequential  # the calibration inputs are exactly the dense model's
    attn, mlp = layer.self_attn, layer.mlp
    H_attn = stats.lookup(i, "attn", dense)
    H_mlp = stats.lookup(i, "mlp", dense and head_rm == 0)
    replay = settings.sequential and st.pruned_out is not None  # outputs follow from the calibration pass
    acc = obs.HessianAccumulator(attn.o_proj.in_features, attn.o_proj.weight.device) if H_attn is None else None
    z = None
    if st.dense_out is not None:
        t0 = phase(i, "dense")
        if dense and (acc is not None or H_mlp is None or replay):
            z = capture_attention_inputs(layer, st.dense_in, st.kwargs, bs, st.where, acc, st.dense_out, tf32)
        else:
            run_layer(layer, st.dense_in, st.kwargs, bs, st.dense_out, tf32)  # the dense reference
        done("dense", t0)
    if z is None and (acc is not None or H_mlp is None or replay):
        t0 = phase(i, "attn-stats")
        z = capture_attention_inputs(layer, calib_in, st.kwargs, bs, st.where, acc, None, tf32)
        done("attn-stats", t0)
    if acc is not None:
        H_attn = stats.store(i, "attn", acc.H, dense)
    kept_units, group = _prune_attention(layer, i, H_attn, settings, head_ratio, head_rm, emit, phase, done)
    columns = None if head_rm == 0 else _unit_columns(kept_units, group, attn.o_proj.weight.device)
    if columns is not None and z is not None and z[0].device == columns.device:
        z, columns = [chunk.index_select(-1, columns) for chunk in z], None  # kept heads selected once
    attn_outputs = mlp_inputs = None  # kept by the MLP-statistics pass when memory allows
    row_bytes = calib_in.shape[:-1].numel() * calib_in.element_size()
    keep = replay and fits(row_bytes * mlp.down_proj.in_features, st.where)  # down_proj's inputs first
    if H_mlp is None or keep:  # cached statistics: the pass still runs, so the outputs replay as in a cold run
        t0 = phase(i, "mlp-stats")
        acc = obs.HessianAccumulator(mlp.down_proj.in_features, mlp.down_proj.weight.device) if H_mlp is None else None
        keep_attention = keep and fits(row_bytes * (mlp.down_proj.in_features + calib_in.shape[-1]), st.where)
        attn_outputs, mlp_inputs = collect_mlp_inputs(layer, calib_in, st.kwargs, bs, z, columns, acc, st.where,
                                                      keep, keep_attention, tf32)
        if keep_attention:
            z = None  # the outputs follow from what was kept: o_proj's inputs are not needed again
        H_mlp = H_mlp if acc is None else stats.store(i, "mlp", acc.H, dense and head_rm == 0)
        done("mlp-stats", t0)
    down_weight = _prune_mlp(layer, i, H_mlp, settings, ffn_ratio, ffn_rm, emit, phase, done)
    if st.pruned_out is not None:
        t0 = phase(i, "outputs")
        if replay:
            replay_outputs(layer, st.pruned_in, st.kwargs, bs, z, columns, st.pruned_out, attn_outputs, mlp_inputs,
                           down_weight, tf32)
        else:  # dense-input run: the pruned stream differs from the calibrated one
            run_layer(layer, st.pruned_in, st.kwargs, bs, st.pruned_out, tf32)
        done("outputs", t0)


def _unit_columns(units: Sequence[int], group: int, device) -> torch.Tensor:
    """Input columns of the units kept, in order (as the layer surgery keeps them)."""
    if not units:  # every head removed
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(u * group, (u + 1) * group) for u in units]).to(device)


def query_head_units(layer) -> bool:
    """A layer with one KV head shared by several query heads prunes query heads inside that group: removing the
    group would remove the layer's attention (prune_settings.QUERY_HEAD_METHODS plan in these units)."""
    q, kv, _ = layer_shape(layer)
    return kv == 1 and q > 1


def _prune_attention(layer, i, H, settings, ratio, n_remove, emit, phase, done) -> tuple[list[int], int]:
    """Prune layer i's heads: whole KV groups, or query heads when there is one KV group. Returns the units kept and
    the o_proj columns per unit."""
    attn = layer.self_attn
    H = H.to(attn.o_proj.weight.device)
    t0 = phase(i, "attn-prune")
    q, kv, _ = layer_shape(layer)
    by_query_head = query_head_units(layer)
    per_unit = 1 if by_query_head else attn.num_key_value_groups  # query heads per unit
    n_units = q if by_query_head else kv
    group = attn.head_dim * per_unit
    res, rel, predicted = _prune_inputs(attn.o_proj, H, group, n_remove, settings, lambda w: obs.prune_head_groups(
        w, H, group, n_remove, settings.damp, settings.head_error))
    kept = sorted(set(range(n_units)) - set(res.removed))
    if by_query_head:
        keep_query_heads_of(layer, kept)
    else:
        keep_kv_groups(layer, kept)
    done("attn-prune", t0)
    emit(HeadImportance(i, res.first_scores, res.removed, per_unit))
    emit(ModuleMeasured(i, "attn", n_units, n_remove, ratio, rel, predicted, res.damping, time.perf_counter() - t0))
    return kept, group


def _prune_mlp(layer, i, H, settings, ratio, n_remove, emit, phase, done) -> torch.Tensor:
    """Prune layer i's FFN channels; returns down_proj's updated weight at full width (removed columns zero)."""
    mlp = layer.mlp
    H = H.to(mlp.down_proj.weight.device)
    t0 = phase(i, "mlp-prune")
    n_ch = mlp.down_proj.in_features
    res, rel, predicted = _prune_inputs(mlp.down_proj, H, 1, n_remove, settings, lambda w: obs.prune_channels(
        w, H, n_remove, settings.damp, settings.ffn_group_floor, settings.ffn_group_ceiling))
    full_width = mlp.down_proj.weight.data
    keep_channels(layer, sorted(set(range(n_ch)) - set(res.removed)))
    done("mlp-prune", t0)
    emit(_ffn_summary(i, res.first_scores, n_remove, res.steps))
    emit(ModuleMeasured(i, "mlp", n_ch, n_remove, ratio, rel, predicted, res.damping, time.perf_counter() - t0))
    return full_width
