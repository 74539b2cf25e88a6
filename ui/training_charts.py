"""Figures for training jobs (recovery now, continued pre-training later): loss curves as they grow."""
import plotly.graph_objects as go


def loss_curve(steps, heldout, title: str = "Loss (nats per token)") -> go.Figure:
    """Train loss per step and held-out loss at its evaluation steps (step 0: before any update)."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[s.step for s in steps], y=[s.train_loss for s in steps], mode="lines",
                             name="train"))
    fig.add_trace(go.Scatter(x=[h.step for h in heldout], y=[h.loss for h in heldout], mode="lines+markers",
                             name="held-out"))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", height=340,
                      margin=dict(l=40, r=10, t=40, b=40))
    return fig


def perplexity_before_after(rows: dict[str, float], title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(rows), y=list(rows.values()), text=[f"{v:.2f}" for v in rows.values()],
                           textposition="outside"))
    fig.update_layout(title=title, yaxis_title="perplexity", height=320, margin=dict(l=40, r=10, t=40, b=40))
    return fig
