"""Plotly figures for runs side by side (slimgpt_core.workspace.run_comparison's plain data). Pure functions, no Streamlit."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.charts import COLORS


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=360, margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def schedules(sides, colors: dict[str, str] | None = None) -> go.Figure:
    """Per-layer fraction removed, heads and FFN side by side: achieved (lines, from the measured modules) and
    requested (open markers, the schedule's ratios). Runs only: the dense model removes nothing. `colors`: label ->
    the run's colour (ui.colors.run_color)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention heads", "FFN channels"), shared_yaxes=True)
    for k, side in enumerate(s for s in sides if not s.dense):
        color = (colors or {}).get(side.label, COLORS[k % len(COLORS)])
        for col, module, requested in ((1, "attn", side.report.head_ratios), (2, "mlp", side.report.ffn_ratios)):
            mods = sorted((m for m in side.report.modules if m.module == module), key=lambda m: m.layer)
            fig.add_scatter(x=[m.layer for m in mods], y=[m.units_removed / max(1, m.units_total) for m in mods],
                            mode="lines+markers", name=side.label, legendgroup=side.label, showlegend=col == 1,
                            line=dict(color=color), row=1, col=col)
            fig.add_scatter(x=list(range(len(requested))), y=list(requested), mode="markers",
                            name=f"{side.label} (requested)", legendgroup=side.label, showlegend=False,
                            marker=dict(color=color, symbol="circle-open", size=9), row=1, col=col)
    fig.update_yaxes(range=[0, 1])
    fig.update_xaxes(title_text="layer")
    return _layout(fig, "Schedules: fraction removed per layer (lines achieved, circles requested)", "layer",
                   "fraction removed")


def kv_group_diff(grid) -> go.Figure:
    """Layers × KV groups: how many of the runs kept each group (hover: which ones)."""
    n = max(1, len(grid.labels))
    width = max(grid.units) if grid.units else 0
    z, text = [], []
    for layer, units in enumerate(grid.units):
        z.append([len(grid.kept_by(layer, u)) / n if u < units else None for u in range(width)])
        text.append(["kept by: " + (", ".join(grid.kept_by(layer, u)) or "none") if u < units else ""
                     for u in range(width)])
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertemplate="layer %{y}, group %{x}<br>%{text}<extra></extra>",
                               zmin=0, zmax=1, colorscale=[[0, "#d62728"], [0.5, "#ffdd57"], [1, "#2ca02c"]],
                               colorbar=dict(title="kept by", tickvals=[0, 1], ticktext=["none", "all"])))
    marks = [(u, layer) for layer, units in enumerate(grid.units) for u in range(units) if grid.differs(layer, u)]
    if marks:
        fig.add_scatter(x=[m[0] for m in marks], y=[m[1] for m in marks], mode="markers", name="runs differ",
                        marker=dict(symbol="diamond-open", size=12, color="black"))
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_xaxes(dtick=1)
    fig = _layout(fig, "KV groups kept per layer (green: all runs, red: none; ◇ the runs differ)", "KV group",
                  "layer")
    fig.update_layout(height=max(300, 22 * len(grid.units) + 120))
    return fig


def accuracies(groups, colors: dict[str, str] | None = None) -> go.Figure:
    """Every accuracy row as bars with ± 1 standard error, one bar per side; rows are labelled with their
    document count so bars of different settings never look alike."""
    rows = [g for g in groups if g.metric == "acc"]
    labels = list(dict.fromkeys(label for g in rows for label in g.values))
    fig = go.Figure()
    for k, label in enumerate(labels):
        xs, ys, es = [], [], []
        for g in rows:
            if label in g.values:
                n = g.identity.get("n") if g.kind == "task" else "mean"
                xs.append(f"{g.name} (n={n})" if g.kind == "task" else g.name)
                ys.append(g.values[label].value)
                es.append(g.values[label].stderr or 0.0)
        fig.add_bar(x=xs, y=ys, name=label, marker_color=(colors or {}).get(label, COLORS[k % len(COLORS)]),
                    error_y=dict(type="data", array=es, visible=True))
    fig.update_layout(barmode="group")
    return _layout(fig, "Accuracy ± 1 standard error", "task (documents scored)", "accuracy")
