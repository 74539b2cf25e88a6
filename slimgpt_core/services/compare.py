"""Methods and ablations side by side on one model: a grid of (variant × ratio), each pruned from the same
dense model with the same calibration, evaluated the same way; Markdown/CSV table and plots."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from slimgpt_core.base.choices import parse_choices
from slimgpt_core.base.devices import resolve_device
from slimgpt_core.base.events import Progress
from slimgpt_core.data import calibration_tokens
from slimgpt_core.evaluation.evaluate import cached_perplexity
from slimgpt_core.evaluation.zeroshot import zero_shot
from slimgpt_core.methods.pipeline import prune_model
from slimgpt_core.methods.prune_settings import PruneSettings
from slimgpt_core.methods.surgeon import schedule_fraction
from slimgpt_core.models import load_model
from slimgpt_core.schedules.global_allocation import BudgetSpec
from slimgpt_core.schedules.refine import AutoConfig, auto_schedule
from slimgpt_core.schedules.schedule import AUTO_FITNESS_SAMPLES

# name -> (settings overrides, what it shows)
VARIANTS: dict[str, tuple[dict, str]] = {
    "slimgpt": ({}, "SlimGPT: exact head error, dynamic FFN groups, sequential, log schedule"),
    "magnitude": ({"method": "magnitude"}, "column-norm scores, no update"),
    "wanda-sp": ({"method": "wanda-sp"}, "Σ|W|·‖X‖ per head/channel (Wanda structured as in FLAP), no update"),
    "surgeon": ({"method": "surgeon", "shots": 4}, "LLM Surgeon: KFAC curvature from gradients, one global threshold, "
                "4 shots, KV groups and FFN channels as units (a smaller model), correlated o_proj/down_proj column "
                "updates, the units' q/k/v/gate/up rows dead (dead-rows)"),
    "surgeon-2": ({"method": "surgeon", "shots": 2}, "LLM Surgeon as above in 2 shots (for a slow CPU)"),
    "surgeon-16": ({"method": "surgeon", "shots": 16}, "LLM Surgeon as above in 16 shots"),
    "surgeon-both": ({"method": "surgeon", "shots": 4, "surgeon_update": "both"},
                     "LLM Surgeon as first specified: summed row+column costs, row and column updates (over-compensates)"),
    "surgeon-cols": ({"method": "surgeon", "shots": 4, "surgeon_update": "columns"},
                     "LLM Surgeon: summed row+column costs, updates in o_proj/down_proj columns only"),
    "surgeon-rows": ({"method": "surgeon", "shots": 4, "surgeon_units": "rows"},
                     "LLM Surgeon with the paper's units (every row and column): zeros, NOT a smaller model"),
    "kobd": ({"method": "kobd", "shots": 4}, "K-OBD: KFAC cost of zeroing (no update), global threshold, 4 shots"),
    "kobd-2": ({"method": "kobd", "shots": 2}, "K-OBD in 2 shots (for a slow CPU)"),
    "obs-multishot": ({"method": "obs-multishot", "shots": 3},
                      "layer-wise OBS in 3 passes, linear sparsity, curvature re-estimated (the former 'surgeon')"),
    "minitron": ({"method": "minitron"}, "Minitron: activation importance (forward only), no update"),
    "slimgpt-nocomp": ({"compensate": False}, "ablation: OBS choice, no weight update"),
    "slimgpt-approx": ({"head_error": "approx"}, "ablation: authors' approximate head error"),
    "slimgpt-greedy": ({"ffn_group_floor": 1, "ffn_group_ceiling": 1}, "ablation: exhaustive greedy FFN channels"),
    "slimgpt-dense": ({"sequential": False}, "ablation: calibrated on dense inputs"),
    "slimgpt-uniform": ({"schedule": "uniform"}, "ablation: uniform schedule"),
    "slimgpt-linear": ({"schedule": "linear"}, "ablation: linear schedule"),
    "slimgpt-auto": ({"schedule": "auto"}, "auto schedule: a global allocation on Fisher-scaled predicted errors, "
                     "refined by a (1+λ) search on KL over dense-input variants, at the log schedule's achieved "
                     "parameter count (SPEC §7, §10)"),
}


@dataclass
class GridRow:
    variant: str
    ratio: float
    achieved_layer_ratio: float
    achieved_ratio: float
    params_after: int
    prune_seconds: float
    ppl: float | None
    tasks: dict
    mean_acc: float | None
    dense_ppl: float | None
    dense_mean_acc: float | None
    ppl_nll_se: float | None = None  # standard error of the mean per-window NLL (nats); ppl = exp(mean NLL)
    dense_ppl_nll_se: float | None = None


def parse_variants(text: str | list[str]) -> list[str]:
    return parse_choices(text, VARIANTS, "variant")


def run_grid(model_name: str, ratios: list[float], variants: list[str], calib: str = "c4", nsamples: int = 32,
             seqlen: int = 256, seed: int = 0, ppl: str | None = "wikitext2", ppl_seqlen: int = 128,
             ppl_windows: int | None = 64, tasks: list[str] | None = None, limit: int | None = 50,
             base: PruneSettings | None = None, device: str = "auto", callback: Callable | None = None,
             should_stop: Callable[[], bool] | None = None, auto_generations: int = 100,
             auto_seconds: float | None = None) -> list[GridRow]:
    variants = parse_variants(variants)
    base = base or PruneSettings(device=device)
    dev = resolve_device(device)
    emit = callback or (lambda e: None)
    dense = load_model(model_name, device)
    tokens = calibration_tokens(dense.tokenizer, calib, nsamples, seqlen, seed)

    def measure(model, tokenizer):
        model.to(dev)
        p = cached_perplexity(model, tokenizer, ppl, ppl_seqlen, 8, ppl_windows, dev,
                              should_stop=should_stop) if ppl else None
        res = zero_shot(model, tokenizer, tasks, limit, should_stop=should_stop) if tasks else {}
        model.to("cpu")
        accs = {t: r.acc for t, r in res.items()}
        mean = sum(accs.values()) / len(accs) if accs else None
        return (p.ppl if p else None), (p.nll_se if p else None), accs, mean

    total = len(variants) * len(ratios) + 1
    emit(Progress(0, total, "dense", 0.0))
    dense_ppl, dense_se, _, dense_acc = measure(dense.model, dense.tokenizer)
    rows = []
    t_start = time.perf_counter()
    for ratio in ratios:
        for variant in variants:
            emit(Progress(len(rows) + 1, total, f"{variant} {ratio:.0%}", time.perf_counter() - t_start))
            settings = base.updated(ratio=ratio, **VARIANTS[variant][0])
            loaded = load_model(model_name, device)
            if settings.method in ("surgeon", "kobd"):  # global allocation: the parameters the schedule removes
                settings = replace(settings, ratio=schedule_fraction(loaded.model, replace(settings, method="slimgpt")))
            t0 = time.perf_counter()
            if settings.schedule == "auto":
                log_row = next((r for r in rows if r.variant == "slimgpt" and r.ratio == ratio), None)
                settings = _auto_settings(loaded, tokens, settings, calib, seed, device, auto_generations,
                                          auto_seconds, log_row.params_after if log_row else None)
            report = prune_model(loaded.model, tokens, settings, should_stop=should_stop, model_name=model_name)
            seconds = time.perf_counter() - t0
            p, se, accs, mean = measure(loaded.model, loaded.tokenizer)
            rows.append(GridRow(variant, ratio, report.achieved_layer_ratio, report.achieved_ratio,
                                report.params_after, seconds, p, accs, mean, dense_ppl, dense_acc, se, dense_se))
    emit(Progress(total, total, "done", time.perf_counter() - t_start))
    return rows


def _auto_settings(loaded, tokens, settings: PruneSettings, calib: str, seed: int, device: str, generations: int,
                   seconds: float | None, target_params: int | None) -> PruneSettings:
    """The auto schedule (the fast one refined by the KL search, refine.py) at the log row's achieved count when
    there is one, its KL on other calibration windows."""

    fitness = calibration_tokens(loaded.tokenizer, calib, AUTO_FITNESS_SAMPLES, 128, seed + 1)
    config = AutoConfig(budget=BudgetSpec(ratio=settings.ratio, target_params=target_params), max_seconds=seconds,
                        generations=generations, shape=settings.shape, seed=seed, device=device)
    result = auto_schedule(loaded.model, tokens, fitness, config)
    loaded.model.to("cpu")
    return replace(settings, keep_heads=result.keep_heads, keep_ffn=result.keep_ffn, head_ratios=result.head_ratios,
                   ffn_ratios=result.ffn_ratios)


def write_outputs(rows: list[GridRow], out: str | Path, command: str = "", meta: dict | None = None) -> list[Path]:
    """compare.md (with the command that made it), compare.csv, compare.json, and plotly HTML plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = sorted({t for r in rows for t in r.tasks})
    header = ["variant", "ratio", "achieved (layers)", "achieved (all)", "params", "prune s", "ppl", "nll se"] + \
        [f"{t} acc" for t in tasks] + (["mean acc"] if tasks else [])
    table = []
    for r in rows:
        table.append([r.variant, f"{r.ratio:.2f}", f"{r.achieved_layer_ratio:.4f}", f"{r.achieved_ratio:.4f}",
                      f"{r.params_after}", f"{r.prune_seconds:.1f}",
                      f"{r.ppl:.2f}" if r.ppl is not None else "",
                      f"{r.ppl_nll_se:.4f}" if r.ppl_nll_se is not None else ""] +
                     [f"{r.tasks[t]:.3f}" if t in r.tasks else "" for t in tasks] +
                     ([f"{r.mean_acc:.3f}" if r.mean_acc is not None else ""] if tasks else []))
    with open(out / "compare.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + table)
    lines = ["# Methods and ablations", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    if rows and rows[0].dense_ppl is not None:
        dense_acc = f", mean acc {rows[0].dense_mean_acc:.3f}" if rows[0].dense_mean_acc is not None else ""
        dense_se = f" (nll se {rows[0].dense_ppl_nll_se:.4f})" if rows[0].dense_ppl_nll_se is not None else ""
        lines += [f"Dense model: ppl {rows[0].dense_ppl:.2f}{dense_se}{dense_acc}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", "Variants:", ""] + [f"- `{k}`: {v[1]}" for k, v in VARIANTS.items() if k in {r.variant for r in rows}]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    paths = [out / "compare.md", out / "compare.csv", out / "compare.json"]
    for name, fig in figures(rows).items():
        path = out / f"{name}.html"
        fig.write_html(path, include_plotlyjs="cdn")
        paths.append(path)
    return paths


def figures(rows: list[GridRow]) -> dict:
    import plotly.graph_objects as go

    figs = {}
    ratios = sorted({r.ratio for r in rows})
    fig = go.Figure()
    for ratio in ratios:
        sub = [r for r in rows if r.ratio == ratio and r.ppl is not None]
        fig.add_bar(x=[r.variant for r in sub], y=[r.ppl for r in sub], name=f"{ratio:.0%}")
    fig.update_layout(title="Perplexity by variant (lower is better)", barmode="group", yaxis_type="log",
                      height=420)
    figs["compare_ppl"] = fig
    if any(r.mean_acc is not None for r in rows):
        fig = go.Figure()
        for ratio in ratios:
            sub = [r for r in rows if r.ratio == ratio and r.mean_acc is not None]
            fig.add_bar(x=[r.variant for r in sub], y=[r.mean_acc for r in sub], name=f"{ratio:.0%}")
        fig.update_layout(title="Mean zero-shot accuracy by variant", barmode="group", height=420)
        figs["compare_acc"] = fig
    return figs
