"""Error accumulation measured on held-out text: what each pruned layer adds on its own, what the pruned model
carries at each depth, and what it costs at the output (perplexity, KL to the dense model).

For layer i, with h^d_i the dense model's hidden state after layer i, h^p_i the pruned model's, and f^p_i the pruned
layer i:
- own error   e^own_i = f^p_i(h^d_{i-1}) − h^d_i   (the pruned layer on the dense model's inputs: what it adds alone)
- total error e^tot_i = h^p_i − h^d_i               (what the pruned model carries after layer i: own + inherited)
Layer 0's inputs are the embeddings, identical in both models, so e^own_0 = e^tot_0.

Two normalisations, both sums over every held-out token t and hidden dimension c, accumulated in fp64.
With E_c = Σ_t e[t,c]² and D_c = Σ_t h^d_i[t,c]²:
- raw          ‖e‖/‖h^d_i‖ = sqrt(Σ_c E_c / Σ_c D_c). Each dimension weighs by its dense energy D_c, so the
  few residual-stream outlier dimensions (massive activations, up to thousands of times the typical size) decide the
  number; where they switch on, the denominator jumps and the curve falls without the model getting better.
- standardised sqrt(mean_c E_c / D_c): every dimension divided by the dense stream's RMS of that dimension at that
  layer, s_c = sqrt(D_c / N), then the RMS over tokens and dimensions: sqrt(mean_{t,c} (e[t,c]/s_c)²). Each
  dimension counts equally, and scaling one dimension of both streams leaves it unchanged. A dimension the dense
  stream never uses (D_c ≤ 1e-12 · mean D) has no scale to divide by and is left out of the mean.

The outcome in one number per model on the same windows: perplexity (mean next-token NLL over positions 0..L−2 of
every window, as `evaluate.perplexity`) and KL(dense ‖ pruned) of the next-token distributions, averaged over every
position of every window.

The rest of the module is the studio's demo: which runs the story needs at one budget, finding them in the
workspace when a run with identical settings exists, pruning the missing ones and profiling each (stored with the
run as an "accumulation" measurement)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from slimgpt_core import data
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.errors import JobCancelled, SlimGPTError
from slimgpt_core.base.events import Progress, RunReport
from slimgpt_core.evaluation.evaluate import text_windows
from slimgpt_core.methods.prune_settings import PruneSettings, plan_removals
from slimgpt_core.models import _resolve_alias
from slimgpt_core.services.prune import prune_to_workspace
from slimgpt_core.workspace.model_pool import POOL
from slimgpt_core.workspace.store import add_measurement, list_runs, read_run

PROFILE_KIND = "accumulation"
UNUSED_DIMENSION = 1e-12  # D_c below this fraction of the mean: a dimension the dense stream does not use
PROFILED = "profiled"  # the phase of the progress event a demo job emits when a run's profile is stored
OUTLIER_FRACTION = 0.01  # the "largest dimensions" whose share of the dense stream's energy is reported


@dataclass
class AccumulationProfile:
    own_raw: list[float]
    total_raw: list[float]
    own_std: list[float]
    total_std: list[float]
    dense_rms: list[float]  # RMS of the dense hidden state after each layer, over tokens and dimensions
    outlier_share: list[float]  # share of the dense stream's energy in its largest 1% of dimensions (at least one)
    ppl: float
    ppl_dense: float
    kl: float  # nats per position
    windows: int
    seqlen: int
    dataset: str = ""

    def own(self, scale: str) -> list[float]:
        return self.own_std if scale == "standardised" else self.own_raw

    def total(self, scale: str) -> list[float]:
        return self.total_std if scale == "standardised" else self.total_raw

    def record(self) -> dict:
        """As stored in a run's evaluations.json: the per-layer lists under `points` (listings skip them)."""
        d = asdict(self)
        points = {k: d.pop(k) for k in ("own_raw", "total_raw", "own_std", "total_std", "dense_rms",
                                        "outlier_share")}
        return {**d, "points": points}

    @classmethod
    def from_record(cls, record: dict) -> "AccumulationProfile":
        fields = {k: record[k] for k in ("ppl", "ppl_dense", "kl", "windows", "seqlen", "dataset")}
        return cls(**record["points"], **fields)


def _output(y):
    return y[0] if isinstance(y, tuple) else y


_CACHE_KWARGS = ("hidden_states", "past_key_values", "past_key_value", "use_cache")


def _capture(model, ids: torch.Tensor, inputs: bool):
    """Logits and every decoder layer's output (and, with `inputs`, its input hidden state and other kwargs)."""
    layers = model.model.layers
    outs: list = [None] * len(layers)
    ins: list = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda m, a, y, i=i: outs.__setitem__(i, _output(y).detach())))
        if inputs:
            def pre(m, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                ins[i] = (hidden.detach(), {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS})
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outs, ins


class _Sums:
    """Per layer and hidden dimension, fp64 sums of squares over tokens: dense energy, own and total error."""

    def __init__(self, n_layers: int, hidden: int):
        z = lambda: torch.zeros(n_layers, hidden, dtype=torch.float64)  # noqa: E731
        self.dense, self.own, self.total = z(), z(), z()
        self.tokens = 0

    def add(self, i: int, dense: torch.Tensor, own: torch.Tensor, total: torch.Tensor) -> None:
        d = dense.double().reshape(-1, dense.shape[-1])
        self.dense[i] += (d * d).sum(0)
        self.own[i] += ((own.double().reshape(d.shape) - d) ** 2).sum(0)
        self.total[i] += ((total.double().reshape(d.shape) - d) ** 2).sum(0)


def relative_errors(err_sq: torch.Tensor, dense_sq: torch.Tensor) -> tuple[float, float]:
    """(raw, standardised) from per-dimension sums of squares of one layer's error and dense state."""
    raw = math.sqrt(float(err_sq.sum() / dense_sq.sum())) if float(dense_sq.sum()) > 0 else 0.0
    used = dense_sq > UNUSED_DIMENSION * dense_sq.mean()
    std = math.sqrt(float((err_sq[used] / dense_sq[used]).mean())) if bool(used.any()) else 0.0
    return raw, std


def accumulation_profile(dense_model, pruned_model, windows: torch.Tensor, batch_size: int = 4,
                         device: torch.device | str = "cpu", dataset: str = "",
                         progress: Callable[[int, int], None] | None = None,
                         should_stop: Callable[[], bool] | None = None) -> AccumulationProfile:
    """The accumulation profile of `pruned_model` against `dense_model` on held-out `windows` [W, L] of token ids.

    Both models are moved to `device` for the measurement and back afterwards. Layers may differ in shape (heads
    and FFN width per layer): pruned layer i runs on the dense model's inputs with the dense layer's own kwargs
    (position embeddings, masks)."""
    dense_layers, pruned_layers = dense_model.model.layers, pruned_model.model.layers
    if len(dense_layers) != len(pruned_layers):
        raise SlimGPTError(f"the pruned model has {len(pruned_layers)} decoder layers and the dense one "
                           f"{len(dense_layers)}: a layer-by-layer profile needs the same depth")
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise SlimGPTError(f"held-out windows must be [windows, length >= 2] token ids, got {list(windows.shape)}")
    device = torch.device(device)
    homes = [next(m.parameters()).device for m in (dense_model, pruned_model)]
    hidden = dense_model.config.hidden_size
    sums = _Sums(len(dense_layers), hidden)
    nll_sum = {"dense": 0.0, "pruned": 0.0}
    kl_sum, positions, predicted = 0.0, 0, 0
    n = windows.shape[0]
    try:
        dense_model.to(device)
        pruned_model.to(device)
        with torch.no_grad():
            for s in range(0, n, batch_size):
                if should_stop is not None and should_stop():
                    raise JobCancelled("the accumulation profile was cancelled")
                ids = windows[s:s + batch_size].to(device)
                logits_d, outs_d, ins_d = _capture(dense_model, ids, inputs=True)
                logits_p, outs_p, _ = _capture(pruned_model, ids, inputs=False)
                for i, layer in enumerate(pruned_layers):
                    x, kwargs = ins_d[i]
                    dtype = next(layer.parameters()).dtype
                    own = _output(layer(x.to(dtype), **kwargs))
                    sums.add(i, outs_d[i], own, outs_p[i])
                # at least fp32 (fp16 logits lose the small probabilities KL sums over)
                logits_d, logits_p = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (logits_d, logits_p))
                for name, logits in (("dense", logits_d), ("pruned", logits_p)):
                    nll_sum[name] += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           ids[:, 1:].reshape(-1), reduction="sum"))
                log_d, log_p = F.log_softmax(logits_d, -1), F.log_softmax(logits_p, -1)
                kl_sum += float(F.kl_div(log_p, log_d, log_target=True, reduction="sum"))
                positions += ids.numel()
                predicted += ids[:, 1:].numel()
                if progress is not None:
                    progress(min(s + batch_size, n), n)
    finally:
        dense_model.to(homes[0])
        pruned_model.to(homes[1])
    own_raw, total_raw, own_std, total_std, rms, share = _per_layer(sums, len(dense_layers), positions, hidden)
    return AccumulationProfile(own_raw, total_raw, own_std, total_std, rms, share,
                               math.exp(nll_sum["pruned"] / predicted), math.exp(nll_sum["dense"] / predicted),
                               kl_sum / positions, n, windows.shape[1], dataset)


def _per_layer(sums: "_Sums", n_layers: int, positions: int, hidden: int) -> tuple[list[float], ...]:
    """Per layer: own and total relative errors (raw and standardised), the dense output's RMS, the outlier share."""
    own_raw, own_std, total_raw, total_std, rms, share = [], [], [], [], [], []
    k = max(1, round(OUTLIER_FRACTION * hidden))
    for i in range(n_layers):
        a, b = relative_errors(sums.own[i], sums.dense[i])
        c, d = relative_errors(sums.total[i], sums.dense[i])
        own_raw.append(a), own_std.append(b), total_raw.append(c), total_std.append(d)
        rms.append(math.sqrt(float(sums.dense[i].sum()) / (positions * hidden)))
        share.append(float(sums.dense[i].topk(k).values.sum() / sums.dense[i].sum()))
    return own_raw, total_raw, own_std, total_std, rms, share


def heldout_windows(tokenizer, source: str, seqlen: int, windows: int) -> torch.Tensor:
    """The first `windows` non-overlapping windows of the held-out text (the windows `perplexity` evaluates)."""

    if seqlen < 2 or windows < 1:
        raise SlimGPTError(f"held-out text needs windows >= 1 of length >= 2, got {windows} of {seqlen}")
    tokens = data.evaluation_tokens(tokenizer, source)
    bos = data.window_bos(tokenizer)
    text_len = seqlen if bos is None else seqlen - 1
    if tokens.numel() < text_len:
        raise SlimGPTError(f"held-out text {source} has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return text_windows(tokens, seqlen, windows, bos)


# --- the studio's demo: the runs the story needs at one budget -------------------------------------------------

@dataclass(frozen=True)
class DemoRun:
    key: str
    title: str  # what the charts call it
    schedule: str
    sequential: bool


DEMO_RUNS = (DemoRun("slimgpt", "SlimGPT (sequential, log)", "log", True),
             DemoRun("twin", "dense inputs, log", "log", False),
             DemoRun("uniform", "sequential, uniform", "uniform", True),
             DemoRun("uniform-twin", "dense inputs, uniform", "uniform", False))


@dataclass(frozen=True)
class DemoConfig:
    """One budget, one calibration, one held-out text: every run of the demo shares them."""
    ratio: float = 0.3
    shape: float = 4.0
    calib: str = "c4"
    nsamples: int = 8
    seqlen: int = 128
    seed: int = 0
    heldout: str = "wikitext2"
    eval_seqlen: int = 128
    windows: int = 32
    uniform_twin: bool = True
    device: str = "auto"

    @property
    def runs(self) -> tuple[DemoRun, ...]:
        return DEMO_RUNS if self.uniform_twin else DEMO_RUNS[:3]

    def settings(self, run: DemoRun):
        return PruneSettings(ratio=self.ratio, schedule=run.schedule, shape=self.shape, sequential=run.sequential,
                             device=self.device)

    def profile_identity(self, dense_name: str) -> dict:
        return {"dataset": self.heldout, "seqlen": self.eval_seqlen, "windows": self.windows, "dense": dense_name}


@dataclass
class DemoEntry:
    run: DemoRun
    settings: object  # PruneSettings
    found: object | None = None  # workspace.RunInfo of a run with identical settings
    profile: AccumulationProfile | None = None


def same_model(a: str, b: str) -> bool:
    """Two names of one base model: equal, or aliases of the same local file ("default" and "smollm2")."""

    if a == b:
        return True
    try:
        return _resolve_alias(a) == _resolve_alias(b)
    except SlimGPTError:  # an alias whose asset is missing names nothing
        return False


_SAME = ("method", "damp", "head_error", "ffn_group_floor", "ffn_group_ceiling", "compensate", "sequential")


def same_run(report, model_name: str, settings, removals: tuple[list[int], list[int]], calib: str, nsamples: int,
             seqlen: int, seed: int) -> bool:
    """Whether a run's report describes the prune `settings` would make: the same model, method and OBS options,
    calibration and sequential mode, and the same number of KV groups and FFN channels removed in every layer
    (the Prune page's rounded preset ratios count as the preset)."""
    s = report.settings or {}
    if not same_model(report.model, model_name) or report.recovery or getattr(report, "pretrain", None):
        return False
    defaults = settings.record()
    if any(s.get(k, defaults[k]) != defaults[k] for k in _SAME):
        return False
    if s.get("method", "slimgpt") == "obs-multishot" or s.get("keep_heads") or s.get("keep_ffn"):
        return False
    if (s.get("calib"), s.get("nsamples"), s.get("seqlen"), s.get("seed")) != (calib, nsamples, seqlen, seed):
        return False
    removed = {kind: [m.units_removed for m in sorted(report.modules, key=lambda m: m.layer) if m.module == kind]
               for kind in ("attn", "mlp")}
    return removed["attn"] == list(removals[0]) and removed["mlp"] == list(removals[1])


def stored_profile(evaluations: list[dict], identity: dict) -> AccumulationProfile | None:
    """The newest stored profile measured on this held-out text against this dense model."""
    for record in reversed(evaluations):
        if record.get("kind") == PROFILE_KIND and all(
                same_model(str(record.get(k)), v) if k == "dense" else record.get(k) == v for k, v in identity.items()):
            try:
                return AccumulationProfile.from_record(record)
            except (KeyError, TypeError):
                continue  # a record of another layout: not this measurement
    return None


def demo_entries(dense_model, model_name: str, config: DemoConfig,
                 runs: list[tuple[object, object]]) -> list[DemoEntry]:
    """The demo's runs at this budget, each with the newest workspace run of identical settings (`runs`: pairs of
    RunInfo and its report, newest first) and that run's stored profile on this held-out text."""

    entries = []
    for run in config.runs:
        settings = config.settings(run)
        _, _, head_rm, ffn_rm = plan_removals(dense_model, settings)
        entry = DemoEntry(run, settings)
        for info, report in runs:
            if same_run(report, model_name, settings, (head_rm, ffn_rm), config.calib, config.nsamples,
                        config.seqlen, config.seed):
                entry.found = info
                entry.profile = stored_profile(info.evaluations, config.profile_identity(model_name))
                break
        entries.append(entry)
    return entries


@dataclass
class DemoResult:
    runs: dict[str, str] = field(default_factory=dict)  # demo key -> run folder name
    made: list[str] = field(default_factory=list)  # keys pruned by this job (the others were reused)
    profiled: list[str] = field(default_factory=list)  # keys profiled by this job


def profile_run(loaded, info, config: DemoConfig, callback: Callable | None = None,
                should_stop: Callable[[], bool] | None = None) -> AccumulationProfile:
    """Profile a workspace run against the loaded dense model and store it with the run (with provenance)."""

    device = resolve_device(config.device)
    windows = heldout_windows(loaded.tokenizer, config.heldout, config.eval_seqlen, config.windows)
    pruned = POOL.get(str(info.path), config.device)
    emit = callback or (lambda e: None)
    profile = accumulation_profile(loaded.model, pruned.model, windows, device=device, dataset=config.heldout,
                                   progress=lambda d, t: emit(Progress(d, t, f"profile {info.name}", 0.0)),
                                   should_stop=should_stop)
    record = profile.record()
    record["windows"] = config.windows  # the identity asks for this many (fewer when the text is short)
    add_measurement(info.path, PROFILE_KIND, record, dense=loaded.name, device=str(device),
                    dtype=str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
                    windows_measured=profile.windows, tokens=int(windows.numel()))
    return profile


def run_demo(loaded, config: DemoConfig, callback: Callable | None = None,
             should_stop: Callable[[], bool] | None = None) -> DemoResult:
    """The job behind the demo's one button: for each run the story needs, reuse the newest workspace run with
    identical settings or prune one (`services.prune.prune_to_workspace`), then profile it unless a profile on this held-out
    text is stored. Each run and each profile is on disk as soon as it is done, so a cancel keeps them."""

    emit = callback or (lambda e: None)
    t0 = time.perf_counter()

    def listed():
        out = []
        for info in list_runs():
            if info.broken is None and (info.path / "report.json").exists():
                try:
                    out.append((info, RunReport.load(info.path / "report.json")))
                except (OSError, ValueError, TypeError, KeyError):
                    continue  # an unreadable report is not a run to reuse
        return out

    entries = demo_entries(loaded.model, loaded.name, config, listed())
    total = 2 * len(entries)  # each run: made (or found), then profiled
    result = DemoResult()
    for k, entry in enumerate(entries):
        def progress(event, step):
            if getattr(event, "kind", None) == "progress":
                frac = event.layer / max(1, event.n_layers)
                emit(Progress(step * 100 + int(100 * frac), total * 100, f"{entry.run.title}: {event.phase}",
                              time.perf_counter() - t0))

        if entry.found is None:
            emit(Progress(2 * k * 100, total * 100, f"{entry.run.title}: pruning", time.perf_counter() - t0))
            entry.found = prune_to_workspace(loaded, entry.settings, config.calib, config.nsamples, config.seqlen,
                                             config.seed, label=f"demo · {entry.run.title} {config.ratio:.0%}",
                                             device=config.device, callback=lambda e: progress(e, 2 * k),
                                             should_stop=should_stop)
            result.made.append(entry.run.key)
        result.runs[entry.run.key] = entry.found.name
        if entry.profile is None:  # profiled at once: a run shows on the page as soon as it is measured
            emit(Progress((2 * k + 1) * 100, total * 100, f"{entry.run.title}: profile", time.perf_counter() - t0))
            entry.profile = profile_run(loaded, read_run(entry.found.path), config,
                                        lambda e: progress(e, 2 * k + 1), should_stop)
            result.profiled.append(entry.run.key)
            emit(Progress((2 * k + 2) * 100, total * 100, f"{entry.run.title}: {PROFILED}", time.perf_counter() - t0))
    emit(Progress(total * 100, total * 100, "done", time.perf_counter() - t0))
    return result


def profile_runs(loaded, infos: list, config: DemoConfig, callback: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Profile several workspace runs (the Inspect page's button); returns the names profiled."""
    done = []
    for k, info in enumerate(infos):
        if callback is not None:
            callback(Progress(k, len(infos), f"profile {info.title}", 0.0))
        profile_run(loaded, info, config, None, should_stop)
        done.append(info.name)
    return done


_PAIRS = (("slimgpt", "twin"), ("uniform", "uniform-twin"))


def story(entries: list[DemoEntry], scale: str) -> dict[str, str]:
    """One caption per chart, from the numbers (it says so when they do not show the paper's point)."""
    by = {e.run.key: e for e in entries if e.profile is not None}
    out = {}
    scale_name = "on the outlier-robust scale" if scale == "standardised" else "on the raw scale"
    if "slimgpt" in by:
        p = by["slimgpt"].profile
        own, tot = p.own(scale), p.total(scale)
        deep = max(range(len(tot)), key=lambda i: tot[i] - own[i])
        out["own"] = (f"Each bar is what layer i adds on its own (pruned layer on the dense model's inputs); the "
                      f"line is what the pruned model carries after it. The gap is inherited: at layer {deep} the "
                      f"model carries {tot[deep]:.3f} while the layer alone adds {own[deep]:.3f} ({scale_name}).")
    lines = []
    for run, twin in _PAIRS:
        if run in by and twin in by:
            p, q = by[run].profile, by[twin].profile
            a, b = p.total(scale)[-1], q.total(scale)[-1]
            verdict = ("lower: calibrated on the pruned model's inputs, each layer compensated part of what it "
                       "inherited" if a < b else "not lower: here sequential calibration does not reduce what the "
                       "last layer carries")
            lines.append(f"{by[run].run.schedule}: sequential {a:.3f} vs dense inputs {b:.3f} at the last layer, "
                         f"{verdict} (PPL {p.ppl:.2f} vs {q.ppl:.2f}, KL {p.kl:.3f} vs {q.kl:.3f})")
    if lines:
        out["sequential"] = "; ".join(lines) + f"; {scale_name}."
    if "slimgpt" in by and "uniform" in by:
        a, b = by["slimgpt"].profile, by["uniform"].profile
        ta, tb = a.total(scale), b.total(scale)
        half = len(ta) // 2
        verdict = ("the log schedule prunes shallow layers less, so deep layers inherit less" if ta[-1] < tb[-1]
                   else "here the log schedule does not end lower than uniform")
        out["schedule"] = (f"Log vs uniform at the same budget: {ta[half]:.3f} vs {tb[half]:.3f} at layer {half}, "
                           f"{ta[-1]:.3f} vs {tb[-1]:.3f} at the last layer; {verdict} ({scale_name}). "
                           f"PPL {a.ppl:.2f} vs {b.ppl:.2f}, KL {a.kl:.3f} vs {b.kl:.3f}.")
    if by:
        e = by.get("slimgpt") or next(iter(by.values()))
        p = e.profile
        j = max(range(1, len(p.dense_rms)), key=lambda i: p.dense_rms[i] / p.dense_rms[i - 1], default=0)
        out["scale"] = (f"Why two scales: the dense stream's RMS goes from {p.dense_rms[max(0, j - 1)]:.2f} to "
                        f"{p.dense_rms[j]:.2f} at layer {j}, where its largest 1% of dimensions carry "
                        f"{p.outlier_share[j]:.0%} of its energy. The raw ‖Δh‖/‖h‖ divides by that norm: "
                        f"{e.run.title}'s raw total goes {p.total_raw[max(0, j - 1)]:.3f} → {p.total_raw[j]:.3f} "
                        f"there, its outlier-robust total {p.total_std[max(0, j - 1)]:.3f} → {p.total_std[j]:.3f} "
                        "(every dimension weighs the same).")
    return out


def twin_differences(entries: list[DemoEntry], scale: str) -> dict[str, list[float]]:
    """Per schedule, the sequential run's total error minus its dense-input twin's, by the sequential run's key:
    below zero, sequential calibration carried less error to that depth."""
    by = {e.run.key: e for e in entries if e.profile is not None}
    return {run: [a - b for a, b in zip(by[run].profile.total(scale), by[twin].profile.total(scale))]
            for run, twin in _PAIRS if run in by and twin in by}


def inherited(entries: list[DemoEntry], scale: str) -> dict[str, list[float]]:
    """Per run (by key), total minus own error per layer: what each layer's output carries beyond its own error."""
    return {e.run.key: [t - o for t, o in zip(e.profile.total(scale), e.profile.own(scale))]
            for e in entries if e.profile is not None}
