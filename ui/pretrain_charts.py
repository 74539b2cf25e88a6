"""Figures of continued pre-training as it runs: the training loss, each domain's held-out loss against its
reference (what dynamic batch loading steers by) and the domain weights the batches are drawn with."""
import plotly.graph_objects as go
from plotly.colors import qualitative

_LAYOUT = dict(height=340, margin=dict(l=40, r=10, t=40, b=40), xaxis_title="step",
               legend=dict(orientation="h", y=-0.25))


def _color(i: int) -> str:
    return qualitative.Plotly[i % len(qualitative.Plotly)]


def loss_curve(steps) -> go.Figure:
    """The training loss of every step (labels, distillation KL or their mix)."""
    fig = go.Figure(go.Scatter(x=[e.step for e in steps], y=[e.loss for e in steps], mode="lines", name="loss"))
    fig.update_layout(title="Training loss (nats per token)", yaxis_title="loss", **_LAYOUT)
    return fig


def domain_losses(steps, reference: dict[str, float]) -> go.Figure:
    """Held-out loss per domain (solid) and its reference loss (dashed, same colour): the mix moves toward the
    domains whose solid line lies above their dashed one."""
    fig = go.Figure()
    xs = [e.step for e in steps]
    domains = list(steps[-1].domain_losses) if steps else []
    for i, name in enumerate(domains):
        fig.add_trace(go.Scatter(x=xs, y=[e.domain_losses.get(name) for e in steps], mode="lines", name=name,
                                 line=dict(color=_color(i))))
        if name in reference and xs:
            fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[reference[name]] * 2, mode="lines",
                                     name=f"{name} reference", line=dict(color=_color(i), dash="dash")))
    fig.update_layout(title="Held-out loss per domain (dashed: reference)", yaxis_title="loss", **_LAYOUT)
    return fig


def domain_weights(steps) -> go.Figure:
    """The share of each domain in the batches, stacked to 1."""
    fig = go.Figure()
    xs = [e.step for e in steps]
    for i, name in enumerate(list(steps[-1].weights) if steps else []):
        fig.add_trace(go.Scatter(x=xs, y=[e.weights.get(name, 0.0) for e in steps], mode="lines", name=name,
                                 stackgroup="mix", line=dict(color=_color(i))))
    fig.update_layout(title="Domain weights", yaxis_title="share of the batches", yaxis=dict(range=[0, 1]),
                      **_LAYOUT)
    return fig
