"""Plotly figures, pure functions of a RunView (or of several, for the history tab)."""
from __future__ import annotations

import plotly.graph_objects as go

from .state import LAYERS, RunView

HEIGHT = 380
ACCENT = "#d9480f"
FADED = "#868e96"


def _layout(fig: go.Figure, title: str, xaxis: str, yaxis: str, log_y: bool = False) -> go.Figure:
    fig.update_layout(title=title, height=HEIGHT, margin=dict(l=60, r=20, t=50, b=45), template="plotly_white",
                      uirevision="keep",  # zoom and legend toggles survive updates
                      xaxis_title=xaxis, yaxis_title=yaxis, legend=dict(orientation="v"))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def loss_curves(view: RunView) -> go.Figure:
    """Reconstruction loss against step, one trace per block: the current block bright, finished ones faded,
    each block's loss before training as a diamond at step 0."""
    fig = go.Figure()
    current = max(view.steps) if view.steps else None
    for block in sorted(view.steps):
        fig.add_trace(_block_curve(view, block, live=block == current and view.status == "running"))
    if view.initial:
        blocks = sorted(view.initial)
        fig.add_trace(go.Scatter(x=[0] * len(blocks), y=[view.initial[b] for b in blocks], mode="markers",
                                 name="loss before EBFT", marker=dict(symbol="diamond", size=8, color="#1c7ed6"),
                                 text=[f"block {b}" for b in blocks]))
    return _layout(fig, "Reconstruction loss while EBFT trains", "step within block", "MSE vs dense block",
                   log_y=True)


def _block_curve(view: RunView, block: int, live: bool) -> go.Scatter:
    """One block's losses, from its loss before training (step 0) when it is known."""
    xs, ys = [s for s, _ in view.steps[block]], [l for _, l in view.steps[block]]
    if block in view.initial:
        xs, ys = [0] + xs, [view.initial[block]] + ys
    return go.Scatter(x=xs, y=ys, mode="lines", name=f"block {block}",
                      line=dict(color=ACCENT if live else FADED, width=3 if live else 1.2),
                      opacity=1.0 if live else 0.45)


def loss_bars(view: RunView) -> go.Figure:
    """Per block: the loss before EBFT (pruned) and after it."""
    blocks = sorted(view.initial)
    fig = go.Figure([
        go.Bar(x=blocks, y=[view.initial[b] for b in blocks], name="before (pruned)", marker_color="#adb5bd"),
        go.Bar(x=blocks, y=[view.final.get(b) for b in blocks], name="after EBFT", marker_color=ACCENT),
    ])
    fig.update_layout(barmode="group")
    return _layout(fig, "Loss per block: before → after", "block", "MSE vs dense block", log_y=True)


def ppl_bars(view: RunView) -> go.Figure:
    labels = list(view.ppl)
    colors = ["#1c7ed6" if l == "dense" else ACCENT if l.startswith("ebft") else "#adb5bd" for l in labels]
    fig = go.Figure(go.Bar(x=labels, y=[view.ppl[l] for l in labels], marker_color=colors,
                           text=[f"{view.ppl[l]:.2f}" for l in labels], textposition="outside"))
    return _layout(fig, "Perplexity (lower is better)", "model", "perplexity")


def sparsity_heatmap(view: RunView, label: str | None = None) -> go.Figure:
    """Measured sparsity of every projection of every block, for ``label`` (default: EBFT, else the last)."""
    if label is None:
        label = "ebft" if "ebft" in view.sparsity else (list(view.sparsity)[-1] if view.sparsity else "")
    per_block = view.sparsity.get(label, {})
    blocks = sorted(per_block)
    z = [[per_block[b].get(layer) for layer in LAYERS] for b in blocks]
    fig = go.Figure(go.Heatmap(z=z, x=list(LAYERS), y=blocks, zmin=0, zmax=1, colorscale="Oranges",
                               colorbar=dict(title="sparsity"),
                               hovertemplate="block %{y}, %{x}: %{z:.2%}<extra></extra>"))
    fig = _layout(fig, f"Measured sparsity ({label or 'no run yet'})", "projection", "block")
    fig.update_yaxes(autorange="reversed")
    return fig


def compare_curves(views: dict[str, RunView]) -> go.Figure:
    """Several runs overlaid: each block's loss before (dashed) and after EBFT (solid)."""
    fig = go.Figure()
    for name, view in views.items():
        blocks = sorted(view.initial)
        if not blocks:
            continue
        fig.add_trace(go.Scatter(x=blocks, y=[view.final.get(b) for b in blocks], mode="lines+markers",
                                 name=f"{name} after", legendgroup=name))
        fig.add_trace(go.Scatter(x=blocks, y=[view.initial[b] for b in blocks], mode="lines",
                                 line=dict(dash="dash"), name=f"{name} before", legendgroup=name))
    return _layout(fig, "Runs compared: loss per block", "block", "MSE vs dense block", log_y=True)
