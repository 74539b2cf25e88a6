"""Figures of a shear job as it runs: the loss, each structure's expected size closing on its target, λ."""
import plotly.graph_objects as go
from plotly.colors import qualitative

# mask name (as in ShearStep.lambdas) -> (key in ShearStep.expected / .target, what the user reads)
STRUCTURES = {"layers": ("layers", "layers"), "kv_groups": ("kv_groups", "KV groups"),
              "heads": ("heads_per_group", "query heads per group"), "ffn": ("ffn", "FFN channels"),
              "hidden": ("hidden", "hidden size")}
_LAYOUT = dict(height=340, margin=dict(l=40, r=10, t=40, b=40), xaxis_title="step")


def _masked(history) -> list[str]:
    """The structures the job masks, in a fixed order (λ is kept per masked structure)."""
    return [name for name in STRUCTURES if history and name in history[0].lambdas]


def _color(i: int) -> str:
    return qualitative.Plotly[i % len(qualitative.Plotly)]


def loss_curve(history) -> go.Figure:
    """The language-model loss under sampled masks, and the Lagrangian term (right axis)."""
    steps = [e.step for e in history]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=[e.loss for e in history], mode="lines", name="LM loss"))
    fig.add_trace(go.Scatter(x=steps, y=[e.lagrangian for e in history], mode="lines", name="Lagrangian term",
                             yaxis="y2", line=dict(dash="dot")))
    fig.update_layout(title="Loss (nats per token)", yaxis_title="loss",
                      yaxis2=dict(title="λ₁(ŝ−t)+λ₂(ŝ−t)²", overlaying="y", side="right", showgrid=False),
                      legend=dict(orientation="h", y=-0.25), **_LAYOUT)
    return fig


def expected_sizes(history, source: dict) -> go.Figure:
    """One line per masked structure: its expected size as a share of the source's, and (dashed, same colour)
    the target it is driven to at that step (rising from the source over the first fifth of the steps)."""
    fig = go.Figure()
    steps = [e.step for e in history]
    for i, name in enumerate(_masked(history)):
        key, label = STRUCTURES[name]
        full = float(source[key] if key in source else source["heads"] // source["kv_groups"])
        expected = [e.expected[key] for e in history]
        target = [e.target[key] for e in history]
        fig.add_trace(go.Scatter(x=steps, y=[v / full for v in expected], mode="lines", name=label,
                                 line=dict(color=_color(i)), customdata=expected,
                                 hovertemplate=f"{label}: %{{customdata:.2f}} expected<extra></extra>"))
        fig.add_trace(go.Scatter(x=steps, y=[v / full for v in target], mode="lines", name=f"{label} target",
                                 line=dict(color=_color(i), dash="dash"), customdata=target,
                                 hovertemplate=f"{label}: target %{{customdata:.2f}}<extra></extra>"))
    fig.update_layout(title="Expected size / source (dashed: target)", yaxis_title="share of the source kept",
                      yaxis=dict(rangemode="tozero"), **_LAYOUT)
    return fig


def lambdas(history) -> go.Figure:
    """The Lagrange multipliers per structure: λ₁ solid, λ₂ dotted (both maximised)."""
    fig = go.Figure()
    steps = [e.step for e in history]
    for i, name in enumerate(_masked(history)):
        label = STRUCTURES[name][1]
        for j, dash in ((0, "solid"), (1, "dot")):
            fig.add_trace(go.Scatter(x=steps, y=[e.lambdas[name][j] for e in history], mode="lines",
                                     name=f"λ{'₁₂'[j]} {label}", line=dict(color=_color(i), dash=dash)))
    fig.update_layout(title="Lagrange multipliers λ", yaxis_title="λ", **_LAYOUT)
    return fig
