"""The sequential layer-wise driver (SPEC §2.4): hooks, forward passes, events. Math lives in obs.py."""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch

from . import obs
from .errors import PruningCancelled, SlimGPTError, out_of_memory_message
from .forwards import (capture_attention_inputs, capture_layer_inputs, collect_hessian, collect_mlp_inputs,
                       replay_outputs, run_layer)
from .events import Callback, FFNScores, HeadImportance, LayerDone, ModuleMeasured, Progress, PruneReport
from .schedule import SCHEDULES, check_ratio, custom_ratios, layer_ratios, units_to_remove
from .surgery import count_parameters, keep_channels, keep_kv_groups, layer_shape, update_config


@dataclass
class PruneSettings:
    ratio: float = 0.2
    schedule: str = "log"  # log | linear | uniform
    shape: float = 4.0  # last/first layer ratio for log and linear
    head_ratio: float | None = None  # mean ratio for heads only (default: ratio)
    ffn_ratio: float | None = None  # mean ratio for FFN channels only (default: ratio)
    head_ratios: list[float] | None = None  # custom per-layer ratios (override the schedule)
    ffn_ratios: list[float] | None = None
    keep_heads: list[int] | None = None  # custom per-layer query heads to keep (override ratios)
    keep_ffn: list[int] | None = None  # custom per-layer FFN channels to keep
    damp: float = 0.01
    head_error: str = "exact"  # exact | approx (authors' code)
    ffn_group_floor: int = 64
    ffn_group_ceiling: int = 1024
    sequential: bool = True  # False: every layer calibrated on the dense model's inputs
    batch_size: int = 8
    device: str = "auto"
    method: str = "slimgpt"  # slimgpt | magnitude | wanda-sp | surgeon | kobd | obs-multishot
    compensate: bool = True  # False (ablation): OBS chooses what to remove, weights are not updated
    shots: int = 3  # surgeon, kobd, obs-multishot: passes over the model, sparsity rising linearly across them
    surgeon_units: str = "heads"  # surgeon/kobd: heads (KV groups + FFN channels, smaller model) | rows (zeros)
    fisher: str = "empirical"  # surgeon/kobd: labels from the data | true (sampled from the model)
    surgeon_update: str = "dead-rows"  # surgeon, heads units: dead-rows (o_proj/down_proj column cost and update; the
    # unit's q/k/v/gate/up rows are dead) | both (summed costs, row and column updates) | columns (summed, columns)
    kfac_positions: int | None = None  # surgeon/kobd: token positions per sequence feeding A and G (sub-sample)
    surgeon_lora_steps: int = 0  # surgeon/kobd: LoRA steps (peft) on the calibration data after every shot; 0: off
    offload_activations: str = "auto"  # auto | never | always: calibration activations in (pinned) CPU memory
    tf32: bool = False  # TF32 matmuls in layer forwards on CUDA (statistics and OBS stay full fp32)
    track_accumulation: bool = True  # False: skip the reference forward that measures accumulated error


METHODS = ("slimgpt", "magnitude", "wanda-sp", "surgeon", "kobd", "obs-multishot", "minitron")


def _validate(settings: PruneSettings) -> None:
    check_ratio(settings.ratio)
    if settings.offload_activations not in ("auto", "never", "always"):
        raise SlimGPTError(f"offload_activations must be auto, never or always, got {settings.offload_activations!r}")
    for name in ("head_ratio", "ffn_ratio"):
        if getattr(settings, name) is not None:
            check_ratio(getattr(settings, name), name.replace("_", " "))
    if settings.schedule not in SCHEDULES:
        raise SlimGPTError(f"unknown schedule {settings.schedule!r} (choose from {', '.join(SCHEDULES)})")
    if not settings.damp >= 0:
        raise SlimGPTError(f"damping must be >= 0, got {settings.damp}")
    if settings.head_error not in ("exact", "approx"):
        raise SlimGPTError(f"head error must be 'exact' or 'approx', got {settings.head_error!r}")
    if settings.batch_size < 1:
        raise SlimGPTError(f"batch size must be >= 1, got {settings.batch_size}")
    if settings.method not in METHODS:
        raise SlimGPTError(f"unknown method {settings.method!r} (choose from {', '.join(METHODS)})")
    if settings.shots < 1:
        raise SlimGPTError(f"shots must be >= 1, got {settings.shots}")
    obs.dynamic_group_sizes(0, settings.ffn_group_floor, settings.ffn_group_ceiling)


def plan_removals(model, settings: PruneSettings) -> tuple[list[float], list[float], list[int], list[int]]:
    """Per-layer ratios and how many KV groups / channels each layer loses. Validates against the model."""
    _validate(settings)
    layers = model.model.layers
    n = len(layers)
    head_r = custom_ratios(settings.head_ratios, n) if settings.head_ratios is not None else layer_ratios(
        n, settings.head_ratio if settings.head_ratio is not None else settings.ratio, settings.schedule, settings.shape)
    ffn_r = custom_ratios(settings.ffn_ratios, n) if settings.ffn_ratios is not None else layer_ratios(
        n, settings.ffn_ratio if settings.ffn_ratio is not None else settings.ratio, settings.schedule, settings.shape)
    head_rm, ffn_rm = [], []
    for i, layer in enumerate(layers):
        q, kv, f = layer_shape(layer)
        rep = q // kv
        if settings.keep_heads is not None:
            if len(settings.keep_heads) != n:
                raise SlimGPTError(f"keep_heads has {len(settings.keep_heads)} entries but the model has {n} layers")
            keep = settings.keep_heads[i]
            if not 1 <= keep <= q:
                raise SlimGPTError(f"layer {i} has {q} query heads: cannot keep {keep} (keep between 1 and {q})")
            if keep % rep:
                raise SlimGPTError(f"layer {i}: cannot keep {keep} query heads: under GQA heads go in groups of "
                                   f"{rep} sharing one KV head, so keep a multiple of {rep}")
            head_rm.append(kv - keep // rep)
            head_r[i] = 1 - keep / q
        else:
            head_rm.append(units_to_remove(kv, head_r[i]))
        if settings.keep_ffn is not None:
            if len(settings.keep_ffn) != n:
                raise SlimGPTError(f"keep_ffn has {len(settings.keep_ffn)} entries but the model has {n} layers")
            keep = settings.keep_ffn[i]
            if not 1 <= keep <= f:
                raise SlimGPTError(f"layer {i} has {f} FFN channels: cannot keep {keep}")
            ffn_rm.append(f - keep)
            ffn_r[i] = 1 - keep / f
        else:
            ffn_rm.append(units_to_remove(f, ffn_r[i]))
    return head_r, ffn_r, head_rm, ffn_rm


def distributed_rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_tokens(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's calibration samples: whole micro-batches, round robin, so every micro-batch (and its
    forward pass) is exactly the one a single process would run."""
    rank, world = distributed_rank_world()
    if world == 1:
        return tokens
    batches = [tokens[s:s + batch_size] for s in range(0, tokens.shape[0], batch_size)]
    mine = batches[rank::world]
    if not mine:
        raise SlimGPTError(f"{len(batches)} calibration batches cannot feed {world} processes: lower --batch-size")
    return torch.cat(mine)


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖/‖b‖ over all shards of a distributed run. Norms in fp64 over chunks (whole-buffer fp64 copies
    cost more than the norms)."""
    import torch.distributed as dist
    sums = torch.zeros(2, dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[0], 16):
        sums[0] += torch.linalg.vector_norm(a[s:s + 16] - b[s:s + 16], dtype=torch.float64).square()
        sums[1] += torch.linalg.vector_norm(b[s:s + 16], dtype=torch.float64).square()
    if distributed_rank_world()[1] > 1:
        dist.all_reduce(sums)
    return float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def _ffn_summary(layer_idx: int, scores: Sequence[float], n_removed: int, steps: list[int]) -> FFNScores:
    s = torch.tensor(scores, dtype=torch.float64)
    s = s[torch.isfinite(s)].clamp_min(1e-30).log10()
    qs = {f"q{int(q * 100)}": float(torch.quantile(s, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}
    lo, hi = float(s.min()), float(s.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(s, bins=20, min=lo, max=hi)
    edges = torch.linspace(lo, hi, 21)
    return FFNScores(layer_idx, len(scores), n_removed, qs, [int(c) for c in counts], edges.tolist(), steps)


MAX_CACHED_STATISTIC_BYTES = 256 * 2**20  # larger Hessians are recomputed rather than cached


class _StatisticsCache:
    """Dense per-layer Hessians in cache/stats, keyed by model fingerprint, calibration tokens, layer, module."""

    def __init__(self, model, tokens: torch.Tensor, enabled: bool):
        from . import cache
        self.enabled = enabled
        # v2: fp64-summed statistics; bump when the way Hessians are accumulated changes
        self.prefix = f"stats-v2|{cache.model_fingerprint(model)}|{cache.tokens_digest(tokens)}" if enabled else ""
        self.reused = 0

    def hessian(self, layer_idx: int, module: str, compute: Callable[[], torch.Tensor], dense: bool) -> torch.Tensor:
        if not (self.enabled and dense):
            return compute()
        from . import cache
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
        from . import cache
        found = cache.lookup_tensors("stats", f"{self.prefix}|{layer_idx}|{module}")
        if found is None:
            return None
        self.reused += 1
        return found["H"]

    def store(self, layer_idx: int, module: str, H: torch.Tensor, dense: bool) -> torch.Tensor:
        if self.enabled and dense and H.numel() * 4 <= MAX_CACHED_STATISTIC_BYTES:
            from . import cache
            cache.store_tensors("stats", f"{self.prefix}|{layer_idx}|{module}", {"H": H})
        return H


def prune_model(model, tokens: torch.Tensor, settings: PruneSettings, callback: Callback | None = None,
                should_stop: Callable[[], bool] | None = None, model_name: str = "",
                use_cache: bool = True) -> PruneReport:
    """Prune `model` in place on calibration `tokens` [N, seqlen] with `settings.method`; return the report."""
    if settings.method == "minitron":  # activation importance, one shot (minitron.py)
        from .minitron import prune_minitron
        return prune_minitron(model, tokens, settings, callback, should_stop, model_name)
    if settings.method in ("surgeon", "kobd"):  # LLM Surgeon and K-OBD: KFAC curvature, global threshold
        from .surgeon import prune_surgeon
        return prune_surgeon(model, tokens, settings, callback, should_stop, model_name)
    if settings.method != "obs-multishot":
        return _prune_pass(model, tokens, settings, callback, should_stop, model_name, use_cache)
    return _prune_multishot(model, tokens, settings, callback, should_stop, model_name, use_cache)


def _prune_multishot(model, tokens, settings, callback, should_stop, model_name, use_cache) -> PruneReport:
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
    for shot in range(1, settings.shots + 1):
        keep_heads = [q - round(h * shot / settings.shots) * (q // kv) for (q, kv, _), h in zip(shapes, head_rm)]
        keep_ffn = [f - round(c * shot / settings.shots) for (_, _, f), c in zip(shapes, ffn_rm)]
        shot_settings = replace(settings, method="slimgpt", keep_heads=keep_heads, keep_ffn=keep_ffn)
        report = _prune_pass(model, tokens, shot_settings, callback, should_stop, model_name, use_cache)
        for k, v in report.phase_seconds.items():
            phases[k] = phases.get(k, 0.0) + v
        total += report.total_seconds
    report.settings = asdict(settings)
    report.head_ratios = [h / kv for (_, kv, _), h in zip(shapes, head_rm)]
    report.ffn_ratios = [c / f for (_, _, f), c in zip(shapes, ffn_rm)]
    report.params_before, report.layer_params_before = params_before, layer_params_before
    report.phase_seconds, report.total_seconds = phases, total
    model.config.slimgpt = {"source_model": model_name, **asdict(settings)}
    return report


def _prune_pass(model, tokens: torch.Tensor, settings: PruneSettings, callback: Callback | None = None,
                should_stop: Callable[[], bool] | None = None, model_name: str = "",
                use_cache: bool = True, _reference: bool = False) -> PruneReport:
    """One sequential pass of SlimGPT (or a scoring baseline) over the model.

    The model may live on the CPU: each decoder layer is moved to the compute device in turn. With
    `use_cache`, dense statistics of layers whose inputs are the dense model's are read from / written to
    cache/stats (layer 0 always; every layer with dense inputs). `_reference` (tests only): the previous
    implementation, which ran each layer's attention four times."""
    from .cache import forget_fingerprint
    from .models import resolve_device

    device = resolve_device(settings.device)
    head_r, ffn_r, head_rm, ffn_rm = plan_removals(model, settings)
    layers = model.model.layers
    n = len(layers)
    t_start = time.perf_counter()
    report = PruneReport(model_name, asdict(settings), head_r, ffn_r, count_parameters(model), 0,
                         count_parameters(layers), 0, device=str(device))

    def emit(event) -> None:
        report.add(event)
        if callback is not None:
            callback(event)
    phase_t = report.phase_seconds

    def phase(layer_idx: int, name: str) -> float:
        if should_stop is not None and should_stop():
            raise PruningCancelled()
        emit(Progress(layer_idx, n, name, time.perf_counter() - t_start))
        return time.perf_counter()

    def done(name: str, t0: float) -> None:
        phase_t[name] = phase_t.get(name, 0.0) + time.perf_counter() - t0

    if distributed_rank_world()[1] > 1:
        use_cache = False  # each rank holds a shard: statistics are only whole after the all-reduce
    stats = _StatisticsCache(model, tokens, use_cache)
    tokens = shard_tokens(tokens, settings.batch_size)
    need_dense, need_pruned = activation_streams(settings)
    act_device = activation_device(model, tokens, device, settings.offload_activations,
                                   2 * (need_dense + need_pruned) + 1)  # + the kept o_proj inputs
    report.settings["activations_on"] = str(act_device)
    tf32 = settings.tf32
    try:
        t0 = phase(0, "capture")
        x0, kwargs = capture_layer_inputs(model, tokens, settings.batch_size, device)
        x0 = _place(x0, act_device)
        # an in/out buffer pair per stream the run keeps
        dense_in = x0 if need_dense else None
        pruned_in = (_buffer_like(x0).copy_(x0) if need_dense else x0) if need_pruned else None
        dense_out = _buffer_like(x0) if need_dense else None
        pruned_out = _buffer_like(x0) if need_pruned else None
        done("capture", t0)
        for i in range(n):
            t_layer = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            home = next(layers[i].parameters()).device
            layer = layers[i].to(device)
            streams = _Streams(dense_in, dense_out, pruned_in, pruned_out, kwargs, act_device)
            step = _reference_layer if _reference else _layer_once
            step(layer, i, streams, settings, (head_r[i], head_rm[i], ffn_r[i], ffn_rm[i]), emit, phase, done,
                 stats)
            acc = _relative_distance(pruned_out, dense_out) if need_dense and need_pruned else float("nan")
            layers[i] = layer.to(home)
            q, kv, f = layer_shape(layer)
            emit(LayerDone(i, q, kv, f, acc, time.perf_counter() - t_layer, _peak_memory_mb(device)))
            if need_dense:
                dense_in, dense_out = dense_out, dense_in
            if need_pruned:
                pruned_in, pruned_out = pruned_out, pruned_in
    except torch.cuda.OutOfMemoryError:
        raise SlimGPTError(out_of_memory_message("pruning", str(device))) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower():
            raise SlimGPTError(out_of_memory_message("pruning", str(device))) from None
        raise
    forget_fingerprint(model)
    report.reused_statistics = stats.reused
    update_config(model)
    model.config.slimgpt = {"source_model": model_name, **asdict(settings), "head_ratios": head_r,
                            "ffn_ratios": ffn_r}
    report.params_after = count_parameters(model)
    report.layer_params_after = count_parameters(layers)
    report.total_seconds = time.perf_counter() - t_start
    report.peak_memory_mb = _peak_memory_mb(device)
    emit(Progress(n - 1, n, "done", report.total_seconds))
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
    return res, obs.relative_error(w0, res.weight, H), (res.predicted_error / denom if denom else 0.0)


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
    the kept heads' columns with the updated o_proj, and so are the outputs, from down_proj's kept inputs when
    they fit in memory (else the pruned MLP runs again). When the calibration stream is the dense one (layer 0,
    dense-input runs) the dense reference pass is the attention pass."""
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
    kept_units = _prune_attention(layer, i, H_attn, settings, head_ratio, head_rm, emit, phase, done)
    group = attn.head_dim * attn.num_key_value_groups
    columns = None if head_rm == 0 else _unit_columns(kept_units, group, attn.o_proj.weight.device)
    a = None
    if H_mlp is None:
        t0 = phase(i, "mlp-stats")
        acc = obs.HessianAccumulator(mlp.down_proj.in_features, mlp.down_proj.weight.device)
        keep_a = replay and _fits(calib_in.shape[:-1].numel() * mlp.down_proj.in_features * calib_in.element_size(),
                                  st.where)
        a = collect_mlp_inputs(layer, calib_in, st.kwargs, bs, z, columns, acc, st.where if keep_a else None, tf32)
        H_mlp = stats.store(i, "mlp", acc.H, dense and head_rm == 0)
        done("mlp-stats", t0)
    kept_channels = _prune_mlp(layer, i, H_mlp, settings, ffn_ratio, ffn_rm, emit, phase, done)
    if st.pruned_out is not None:
        t0 = phase(i, "outputs")
        if replay:
            channels = None if ffn_rm == 0 else torch.as_tensor(kept_channels, device=mlp.down_proj.weight.device)
            replay_outputs(layer, st.pruned_in, st.kwargs, bs, z, columns, st.pruned_out, a, channels, tf32)
        else:  # dense-input run: the pruned stream differs from the calibrated one
            run_layer(layer, st.pruned_in, st.kwargs, bs, st.pruned_out, tf32)
        done("outputs", t0)


def _reference_layer(layer, i, st: _Streams, settings: PruneSettings, plan, emit, phase, done, stats) -> None:
    """The previous implementation (tests compare against it): four attention passes per layer."""
    head_ratio, head_rm, ffn_ratio, ffn_rm = plan
    bs, tf32 = settings.batch_size, settings.tf32
    calib_in = st.pruned_in if settings.sequential else st.dense_in
    dense = i == 0 or not settings.sequential
    if st.dense_out is not None:
        run_layer(layer, st.dense_in, st.kwargs, bs, st.dense_out, tf32)
    H = stats.hessian(i, "attn", lambda: collect_hessian(layer, layer.self_attn.o_proj, calib_in, st.kwargs, bs,
                                                         tf32), dense)
    _prune_attention(layer, i, H, settings, head_ratio, head_rm, emit, phase, done)
    H = stats.hessian(i, "mlp", lambda: collect_hessian(layer, layer.mlp.down_proj, calib_in, st.kwargs, bs, tf32),
                      dense and head_rm == 0)
    _prune_mlp(layer, i, H, settings, ffn_ratio, ffn_rm, emit, phase, done)
    if st.pruned_out is not None:
        run_layer(layer, st.pruned_in, st.kwargs, bs, st.pruned_out, tf32)


def _unit_columns(units: Sequence[int], group: int, device) -> torch.Tensor:
    """Input columns of the units kept, in order (as the layer surgery keeps them)."""
    return torch.cat([torch.arange(u * group, (u + 1) * group) for u in units]).to(device)


def _fits(nbytes: int, where: torch.device) -> bool:
    """Whether a buffer kept between passes fits comfortably (a quarter of what is free there)."""
    have = available_memory_bytes(where)
    return have is None or nbytes < 0.25 * have


def _prune_attention(layer, i, H, settings, ratio, n_remove, emit, phase, done) -> list[int]:
    attn = layer.self_attn
    H = H.to(attn.o_proj.weight.device)
    t0 = phase(i, "attn-prune")
    rep = attn.num_key_value_groups
    n_units = attn.k_proj.out_features // attn.head_dim
    group = attn.head_dim * rep
    res, rel, predicted = _prune_inputs(attn.o_proj, H, group, n_remove, settings, lambda w: obs.prune_head_groups(
        w, H, group, n_remove, settings.damp, settings.head_error))
    kept = sorted(set(range(n_units)) - set(res.removed))
    keep_kv_groups(layer, kept)
    done("attn-prune", t0)
    emit(HeadImportance(i, res.first_scores, res.removed, rep))
    emit(ModuleMeasured(i, "attn", n_units, n_remove, ratio, rel, predicted, res.damping, time.perf_counter() - t0))
    return kept


def _prune_mlp(layer, i, H, settings, ratio, n_remove, emit, phase, done) -> list[int]:
    mlp = layer.mlp
    H = H.to(mlp.down_proj.weight.device)
    t0 = phase(i, "mlp-prune")
    n_ch = mlp.down_proj.in_features
    res, rel, predicted = _prune_inputs(mlp.down_proj, H, 1, n_remove, settings, lambda w: obs.prune_channels(
        w, H, n_remove, settings.damp, settings.ffn_group_floor, settings.ffn_group_ceiling))
    kept = sorted(set(range(n_ch)) - set(res.removed))
    keep_channels(layer, kept)
    done("mlp-prune", t0)
    emit(_ffn_summary(i, res.first_scores, n_remove, res.steps))
    emit(ModuleMeasured(i, "mlp", n_ch, n_remove, ratio, rel, predicted, res.damping, time.perf_counter() - t0))
    return kept


def activation_streams(settings: PruneSettings) -> tuple[bool, bool]:
    """(dense, pruned): the activation streams a run keeps. The dense stream calibrates dense-input runs and is
    the reference for accumulated error; the pruned stream calibrates sequential runs."""
    return (not settings.sequential or settings.track_accumulation,
            settings.sequential or settings.track_accumulation)


def activation_bytes(model, n_tokens: int, buffers: int) -> int:
    return buffers * n_tokens * model.config.hidden_size * next(model.parameters()).element_size()


def activation_device(model, tokens: torch.Tensor, device: torch.device, mode: str = "auto",
                      buffers: int = 4) -> torch.device:
    """Where the calibration activation buffers live: on the GPU when they fit comfortably, else in pinned CPU
    memory (micro-batches are copied to the GPU as each layer runs)."""
    if device.type != "cuda" or mode == "never":
        return device
    if mode == "always":
        return torch.device("cpu")
    free = torch.cuda.mem_get_info(device)[0]
    return device if activation_bytes(model, tokens.numel(), buffers) < 0.5 * free else torch.device("cpu")


def _buffer_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer like x, pinned when x is (fast non-blocking copies to the GPU)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, pin_memory=x.device.type == "cpu" and x.is_pinned())


def _place(x: torch.Tensor, act_device: torch.device) -> torch.Tensor:
    if x.device == act_device:
        return x
    if act_device.type == "cpu" and torch.cuda.is_available():
        return x.to("cpu").pin_memory()
    return x.to(act_device)


def available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(model, nsamples: int, seqlen: int, device: torch.device, buffers: int = 4) -> None:
    """Refuse before starting when the calibration activation buffers cannot fit."""
    need = activation_bytes(model, nsamples * seqlen, buffers)
    have = available_memory_bytes(device)
    if have is not None and need > 0.9 * have:
        raise SlimGPTError(
            f"calibration activations need {need / 2**30:.1f} GiB but {device} has {have / 2**30:.1f} GiB free: "
            + out_of_memory_message("pruning", str(device)).split(": ", 1)[1])


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


def dense_statistics(model, tokens: torch.Tensor, damp: float = 0.01, batch_size: int = 8, device: str = "auto",
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> DenseStatistics:
    """One dense pass collecting every layer's Hessians (cached) and scoring heads and channels.

    With the cache warm this reads files only: the app previews head importance for any ratio at once."""
    from .models import resolve_device

    dev = resolve_device(device)
    stats = _StatisticsCache(model, tokens, True)
    layers = model.model.layers
    x, kwargs = None, None
    head_scores, per_unit, ffn_scores = [], [], []
    for i, layer in enumerate(layers):
        if should_stop is not None and should_stop():
            raise PruningCancelled("statistics were cancelled")
        home = next(layer.parameters()).device
        layer.to(dev)

        def inputs():
            nonlocal x, kwargs
            if x is None:
                x, kwargs = capture_layer_inputs(model, tokens, batch_size, dev)
                for j in range(i):  # catch up through earlier layers whose statistics were cached
                    layers[j].to(dev)
                    x = run_layer(layers[j], x, kwargs, batch_size)
                    layers[j].to(home)
            return x

        attn, mlp = layer.self_attn, layer.mlp
        H_attn = stats.hessian(i, "attn", lambda: collect_hessian(layer, attn.o_proj, inputs(), kwargs, batch_size),
                               True).to(dev)
        H_mlp = stats.hessian(i, "mlp", lambda: collect_hessian(layer, mlp.down_proj, inputs(), kwargs, batch_size),
                              True).to(dev)
        rep = attn.num_key_value_groups
        res = obs.prune_head_groups(attn.o_proj.weight.data.float(), H_attn, attn.head_dim * rep, 0, damp)
        head_scores.append(res.first_scores)
        per_unit.append(rep)
        ffn_scores.append(obs.prune_channels(mlp.down_proj.weight.data.float(), H_mlp, 0, damp).first_scores)
        if x is not None and i + 1 < len(layers):
            x = run_layer(layer, x, kwargs, batch_size)
        layer.to(home)
        if progress is not None:
            progress(i + 1, len(layers))
    return DenseStatistics(head_scores, per_unit, ffn_scores)
