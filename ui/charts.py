"""Plotly figures from the engine's plain data (events, reports, statistics). Pure functions, no Streamlit."""
from __future__ import annotations

import math
import textwrap
from typing import Iterable, Sequence

import plotly.graph_objects as go

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _layout(fig: go.Figure, title: str, x: str, y: str, log_y: bool = False) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=340, margin=dict(l=50, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=-0.25))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def schedule_curve(head_ratios: Sequence[float], ffn_ratios: Sequence[float], heads_kept_frac: Sequence[float] = (),
                   ffn_kept_frac: Sequence[float] = ()) -> go.Figure:
    layers = list(range(len(head_ratios)))
    fig = go.Figure()
    fig.add_scatter(x=layers, y=list(head_ratios), name="heads (requested)", mode="lines+markers")
    fig.add_scatter(x=layers, y=list(ffn_ratios), name="FFN (requested)", mode="lines+markers")
    if heads_kept_frac:
        fig.add_scatter(x=layers, y=[1 - k for k in heads_kept_frac], name="heads (achieved, whole groups)",
                        mode="markers", marker_symbol="square-open")
    if ffn_kept_frac:
        fig.add_scatter(x=layers, y=[1 - k for k in ffn_kept_frac], name="FFN (achieved)", mode="markers",
                        marker_symbol="diamond-open")
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, "Pruning ratio per layer", "layer", "ratio")


def _run_line(color: str | None, dashed: bool) -> dict:
    """A run's line: solid and wide; a dense-input twin's dashed and thinner, so it never hides the run's."""
    return dict(color=color, dash="dash" if dashed else "solid", width=1.8 if dashed else 3)


def _twins_first(labels: Iterable[str], dense_input: Iterable[str]) -> list[str]:
    """Drawing order: dense-input twins first, so the runs' lines are drawn over them."""
    twins = set(dense_input)
    labels = list(labels)
    return [label for label in labels if label in twins] + [label for label in labels if label not in twins]


def reconstruction_error(runs: dict[str, Iterable], colors: dict[str, str] | None = None,
                         dense_input: Iterable[str] = ()) -> go.Figure:
    """Relative reconstruction error per layer, attention and MLP, for one or more runs (ModuleMeasured events).
    `colors`: label -> the run's colour (ui.colors.run_color); `dense_input`: labels of dense-input twins."""
    fig = go.Figure()
    twins = set(dense_input)
    for label in _twins_first(runs, twins):
        modules = list(runs[label])
        color = (colors or {}).get(label, COLORS[list(runs).index(label) % len(COLORS)])
        for module, marker in (("attn", "circle"), ("mlp", "diamond")):
            pts = [m for m in modules if m.module == module]
            line = _run_line(color, label in twins)
            if module == "mlp":
                line.update(dash="dot", width=line["width"] - 1)
            fig.add_scatter(x=[m.layer for m in pts], y=[max(m.rel_error, 1e-12) for m in pts], mode="lines+markers",
                            name=f"{label} · {module}", line=line, marker=dict(symbol=marker))
    return _layout(fig, "Reconstruction error ‖WX−ŴX‖²/‖WX‖²", "layer", "relative error", log_y=True)


def accumulated_error(runs: dict[str, Iterable], colors: dict[str, str] | None = None,
                      dense_input: Iterable[str] = ()) -> go.Figure:
    """‖h_pruned − h_dense‖/‖h_dense‖ after each layer (LayerDone events, on the calibration tokens: the raw
    scale), one line per run; dense-input twins dashed, thinner and drawn first."""
    series = {label: [e.accumulated_error for e in layers] for label, layers in runs.items()}
    xs = {label: [e.layer for e in layers] for label, layers in runs.items()}
    return depth_lines(series, "Accumulated error along depth", "relative distance to dense (raw ‖Δh‖/‖h‖)",
                       colors, dense_input, xs=xs)


def depth_lines(series: dict[str, Sequence[float]], title: str, y_title: str, colors: dict[str, str] | None = None,
                dense_input: Iterable[str] = (), presenter: bool = False, zero_line: bool = False,
                xs: dict[str, Sequence[int]] | None = None) -> go.Figure:
    """One value per layer for each run (label -> values), in the runs' colours; twins dashed, drawn first."""
    fig = go.Figure()
    twins = set(dense_input)
    order = list(series)
    for label in _twins_first(order, twins):
        values = list(series[label])
        color = (colors or {}).get(label, COLORS[order.index(label) % len(COLORS)])
        fig.add_scatter(x=list((xs or {}).get(label, range(len(values)))), y=values, mode="lines+markers", name=label,
                        line=_run_line(color, label in twins), marker=dict(size=5 if label in twins else 7),
                        legendrank=order.index(label))
    if zero_line:
        fig.add_hline(y=0, line=dict(color="gray", width=1))
    return _presenter(_layout(fig, title, "layer", y_title), presenter)


def own_vs_total(label: str, own: Sequence[float], total: Sequence[float], color: str, y_title: str,
                 presenter: bool = False) -> go.Figure:
    """One run: what each layer adds on its own (bars) and what the model carries after it (line); the gap
    between them is inherited."""
    layers = list(range(len(own)))
    fig = go.Figure()
    fig.add_bar(x=layers, y=list(own), name="own: pruned layer on dense inputs", marker_color=color, opacity=0.45)
    fig.add_scatter(x=layers, y=list(total), name="total: pruned model after the layer", mode="lines+markers",
                    line=dict(color=color, width=3),
                    customdata=[t - o for t, o in zip(total, own)],
                    hovertemplate="layer %{x}<br>total %{y:.4f}<br>total − own %{customdata:.4f}<extra></extra>")
    return _presenter(_layout(fig, f"{label}: own vs inherited error per layer", "layer", y_title), presenter)


def dense_stream(rms: Sequence[float], outlier_share: Sequence[float], presenter: bool = False) -> go.Figure:
    """The dense model's hidden state per layer: its RMS and the share of its energy in its largest 1% of
    dimensions (why the raw scale falls where outlier dimensions switch on)."""
    from plotly.subplots import make_subplots

    layers = list(range(len(rms)))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=layers, y=list(rms), name="RMS of the dense hidden state", mode="lines+markers",
                    line=dict(color="#222222", width=3), secondary_y=False)
    fig.add_scatter(x=layers, y=list(outlier_share), name="energy share of its largest 1% of dimensions",
                    mode="lines+markers", line=dict(color="#e6550d", dash="dot", width=2), secondary_y=True)
    fig.update_yaxes(title_text="RMS", type="log", secondary_y=False)
    fig.update_yaxes(title_text="share", range=[0, 1], secondary_y=True)
    return _presenter(_layout(fig, "The dense residual stream: where outlier dimensions switch on", "layer", ""),
                      presenter)


def _presenter(fig: go.Figure, presenter: bool) -> go.Figure:
    """Presenter mode: type readable across a room, one chart filling the screen."""
    if presenter:
        fig.update_layout(font=dict(size=20), title_font=dict(size=28), height=640,
                          margin=dict(l=80, r=30, t=80, b=60))
    return fig


def head_heatmap(scores: Sequence[Sequence[float]], removed: Sequence[Sequence[int]] = (), heads_per_unit: int = 1,
                 title: str = "Head importance (log10 OBS error of removing each group)") -> go.Figure:
    """Layers × heads (KV groups under GQA); removed ones marked with ✕."""
    n_units = max((len(s) for s in scores), default=0)
    z = [[math.log10(v) if v is not None and v > 0 and math.isfinite(v) else None for v in row]
         + [None] * (n_units - len(row)) for row in scores]
    unit = "KV group" if heads_per_unit > 1 else "head"
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_units)), y=list(range(len(scores))), colorscale="Viridis",
                               colorbar=dict(title="log10 ε"), name="importance"))
    xs = [u for i, row in enumerate(removed) for u in row]
    ys = [i for i, row in enumerate(removed) for _ in row]
    fig.add_scatter(x=xs, y=ys, mode="markers", name="removed", marker=dict(symbol="x", size=12, color="red"))
    label = f"{unit} ({heads_per_unit} query heads each)" if heads_per_unit > 1 else unit
    fig = _layout(fig, title, label, "layer")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(autorange="reversed")  # layer 0 at the top, read like a table
    return fig


def predicted_vs_measured(modules: Iterable) -> go.Figure:
    modules = list(modules)
    fig = go.Figure()
    for module in ("attn", "mlp"):
        pts = [m for m in modules if m.module == module and m.rel_error > 0]
        fig.add_scatter(x=[m.predicted_rel_error for m in pts], y=[m.rel_error for m in pts], mode="markers",
                        name=module, text=[f"layer {m.layer}" for m in pts])
    vals = [v for m in modules for v in (m.rel_error, m.predicted_rel_error) if v > 0]
    if vals:
        lo, hi = min(vals), max(vals)
        fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray"))
    fig = _layout(fig, "OBS-predicted vs measured error", "predicted", "measured")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def ffn_histogram(ffn) -> go.Figure:
    """Distribution of first-step channel scores of one layer (FFNScores event)."""
    edges = ffn.histogram_edges
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure(go.Bar(x=centers, y=ffn.histogram_counts, name="channels"))
    fig.add_vline(x=ffn.quantiles.get("q50", 0), line_dash="dash", annotation_text="median")
    return _layout(fig, f"Layer {ffn.layer}: FFN channel scores ({ffn.n_removed} of {ffn.n_channels} removed)",
                   "log10 OBS error", "channels")


def head_scores_bar(head) -> go.Figure:
    colors = ["red" if u in head.removed else "steelblue" for u in range(len(head.scores))]
    fig = go.Figure(go.Bar(x=list(range(len(head.scores))), y=head.scores, marker_color=colors, name="ε"))
    return _layout(fig, f"Layer {head.layer}: error of removing each group (red: removed)", "group", "OBS error",
                   log_y=True)


def _wrapped(label: str, width: int = 24) -> str:
    """A long label over several lines (the bars' axis stays narrow; distinct labels stay distinct)."""
    return "<br>".join(textwrap.wrap(label, width, break_long_words=True, break_on_hyphens=False)) or label


def _bar_height(n_bars: int, lines_per_bar: int = 1) -> int:
    """Horizontal bars: enough height per bar for its label, so labels never overlap and never need rotating."""
    return max(260, max(26, 15 * lines_per_bar + 8) * n_bars + 130)


def evaluation_bars(results: Sequence, metric: str = "acc") -> go.Figure:
    """One group of horizontal bars per task (one bar per model), task names on the y axis as written."""
    fig = go.Figure()
    tasks = list(dict.fromkeys(t for res in results for t in res.tasks))
    for res in results:
        names = [t for t in tasks if t in res.tasks]
        fig.add_bar(y=names, x=[res.tasks[t][metric] for t in names], name=res.label, orientation="h",
                    hovertemplate=f"{res.label}<br>%{{y}}: %{{x:.4f}}<extra></extra>")
    fig = _layout(fig, f"Zero-shot {metric}", metric, "task")
    fig.update_layout(barmode="group", height=_bar_height(len(tasks) * max(1, len(results))),
                      legend=dict(orientation="h", y=-0.15))
    fig.update_yaxes(autorange="reversed", automargin=True, tickangle=0)
    return fig


def perplexity_bars(results: Sequence) -> go.Figure:
    """One horizontal bar per model; long run names wrapped on the axis, whole on hover."""
    measured = [r for r in results if r.perplexity]
    labels = [_wrapped(r.label) for r in measured]
    fig = go.Figure(go.Bar(y=labels, x=[r.perplexity["ppl"] for r in measured],
                           orientation="h", customdata=[r.label for r in measured],
                           hovertemplate="%{customdata}<br>perplexity %{x:.3f}<extra></extra>"))
    fig = _layout(fig, "Perplexity (lower is better)", "perplexity", "model")
    lines = max((label.count("<br>") + 1 for label in labels), default=1)
    fig.update_layout(height=_bar_height(len(measured), lines))
    fig.update_yaxes(autorange="reversed", automargin=True, tickangle=0)
    return fig


def whatif_errors(attn: Sequence[float], mlp: Sequence[float], measured_attn: Sequence[float] = (),
                  measured_mlp: Sequence[float] = ()) -> go.Figure:
    """Predicted relative error of every layer's attention and MLP (dense inputs), optionally beside measured."""
    layers = list(range(len(attn)))
    fig = go.Figure()
    fig.add_bar(x=layers, y=list(attn), name="attention (predicted)", marker_color=COLORS[0])
    fig.add_bar(x=layers, y=list(mlp), name="MLP (predicted)", marker_color=COLORS[1])
    if measured_attn:
        fig.add_scatter(x=layers, y=list(measured_attn), name="attention (measured, sequential)", mode="markers",
                        marker=dict(color=COLORS[0], symbol="x", size=9))
    if measured_mlp:
        fig.add_scatter(x=layers, y=list(measured_mlp), name="MLP (measured, sequential)", mode="markers",
                        marker=dict(color=COLORS[1], symbol="x", size=9))
    title = (f"Predicted error per layer on dense inputs · sum {sum(attn) + sum(mlp):.3g} "
             f"(attention {sum(attn):.3g}, MLP {sum(mlp):.3g})")
    fig.update_layout(barmode="group")
    return _layout(fig, title, "layer", "relative error ‖ΔWX‖²/‖WX‖²")


def sensitivity_map(ratios: Sequence[float], heads: Sequence[Sequence[float]], ffn: Sequence[Sequence[float]],
                    head_path: Sequence[float] = (), ffn_path: Sequence[float] = (), path_name: str = "schedule",
                    measured_heads: Sequence[float] = (), measured_ffn: Sequence[float] = ()) -> go.Figure:
    """Layer × ratio heatmaps of predicted error (log10), heads and FFN side by side, a schedule drawn as a path."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention heads", "FFN channels"), shared_yaxes=True,
                        horizontal_spacing=0.06)
    layers = list(range(len(heads)))
    for col, grid, path, measured in ((1, heads, head_path, measured_heads), (2, ffn, ffn_path, measured_ffn)):
        z = [[math.log10(max(v, 1e-6)) for v in row] for row in grid]
        fig.add_heatmap(x=list(ratios), y=layers, z=z, coloraxis="coloraxis", row=1, col=col,
                        hovertemplate="layer %{y} · ratio %{x}<br>log10 error %{z:.2f}<extra></extra>")
        if path:
            text = [f"measured {m:.2e}" for m in measured] if measured else None
            fig.add_scatter(x=list(path), y=layers, mode="lines+markers", name=path_name if col == 1 else None,
                            showlegend=col == 1, line=dict(color="white", width=2), marker=dict(size=6),
                            text=text, row=1, col=col)
    fig.update_layout(title="Sensitivity map: predicted error on dense inputs (log10), schedule as a path",
                      coloraxis=dict(colorscale="Viridis", colorbar=dict(title="log10")), height=max(340, 14 * len(layers) + 120),
                      margin=dict(l=50, r=20, t=70, b=40))
    fig.update_xaxes(title_text="ratio removed")
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(autorange="reversed")  # layer 0 at the top, as in every layer-axis heatmap here
    return fig


def search_progress(history: Sequence[tuple[int, float]]) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=[g for g, _ in history], y=[k for _, k in history], mode="lines+markers", name="best KL")
    return _layout(fig, "Auto schedule search: KL(dense ‖ candidate) on calibration tokens", "generation", "KL")
