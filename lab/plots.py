"""Plotly figures, pure functions of a RunView (or of several, for the history tab)."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

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
    running = view.status == "running"
    blocks = sorted(view.steps)
    for k, block in enumerate(blocks):
        # while a run goes on, the block training now stands out; once it is over, every block keeps its own
        # colour along a sequence (early blocks light, late ones dark), so each curve can be followed
        color = None if running else _sequential(k, len(blocks))
        fig.add_trace(_block_curve(view, block, live=running and block == current, color=color))
    if view.initial:
        blocks = sorted(view.initial)
        fig.add_trace(go.Scatter(x=[0] * len(blocks), y=[view.initial[b] for b in blocks], mode="markers",
                                 name="loss before EBFT", marker=dict(symbol="diamond", size=8, color="#1c7ed6"),
                                 text=[f"block {b}" for b in blocks]))
    fig = _layout(fig, "Reconstruction loss while EBFT trains", "step within block", "MSE vs dense block",
                  log_y=True)
    if current is not None and current in view.mask_changes:
        _mask_change_trace(fig, view, current)
    return fig


def _mask_change_trace(fig: go.Figure, view: RunView, block: int) -> None:
    """Learned masks (ebft-mask): the share of the block's mask each step changed, on a right-hand axis."""
    steps = view.mask_changes[block]
    fig.add_trace(go.Scatter(x=[s for s, _ in steps], y=[100 * c for _, c in steps], mode="lines+markers",
                             name=f"mask changed, block {block} (% per step)", yaxis="y2",
                             line=dict(color="#2f9e44", dash="dot", width=2), marker=dict(size=5)))
    fig.update_layout(yaxis2=dict(title="mask changed (% of weights)", overlaying="y", side="right",
                                  rangemode="tozero", showgrid=False),
                      legend=dict(x=1.12, xanchor="left"), margin=dict(r=70))  # the legend clear of that axis


def _block_curve(view: RunView, block: int, live: bool, color: str | None = None) -> go.Scatter:
    """One block's losses, from its loss before training (step 0) when it is known; ``color`` for a finished
    run's curves (else the live block is bright and the others faded)."""
    xs, ys = [s for s, _ in view.steps[block]], [l for _, l in view.steps[block]]
    if block in view.initial:
        xs, ys = [0] + xs, [view.initial[block]] + ys
    if color is not None:
        return go.Scatter(x=xs, y=ys, mode="lines", name=f"block {block}", line=dict(color=color, width=1.6))
    return go.Scatter(x=xs, y=ys, mode="lines", name=f"block {block}",
                      line=dict(color=ACCENT if live else FADED, width=3 if live else 1.2),
                      opacity=1.0 if live else 0.45)


def _sequential(k: int, n: int) -> str:
    """The k-th of n colours from light orange to dark red (plotly's Oranges, without its near-white end)."""
    return sample_colorscale("Oranges", [0.3 + 0.7 * k / max(n - 1, 1)])[0]


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
    values = [view.ppl[l] for l in labels]
    fig = go.Figure(go.Bar(x=labels, y=values, marker_color=colors, text=[f"{v:.2f}" for v in values],
                           textposition="outside", cliponaxis=False))
    fig = _layout(fig, "Perplexity (lower is better)", "model", "perplexity")
    if values:  # room above the tallest bar for its label
        fig.update_yaxes(range=[0, max(values) * 1.15])
    return fig


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
    # whole block numbers only, however few blocks are done (at most ~16 ticks)
    fig.update_yaxes(autorange="reversed", tickmode="linear", tick0=0, dtick=max(1, -(-len(blocks) // 16)))
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
