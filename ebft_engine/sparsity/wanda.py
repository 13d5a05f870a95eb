"""Wanda (Sun et al. 2023): score S_ij = |W_ij| · ‖X_j‖₂, compared within each output row; no weight update."""
from __future__ import annotations

import torch

from .patterns import select
from .registry import LayerStats, MaskResult, register


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """(out, in) scores |W| · sqrt(mean_seq ‖x_j‖²); the constant 1/N_seq does not change any ranking."""
    return weight.abs().float() * input_norms.float().sqrt().unsqueeze(0)


@register("wanda", needs=("input_norms",), description="|W|·‖X‖ per output row", rank=1)
def wanda(weight: torch.Tensor, stats: LayerStats, sparsity: float, nm, **_) -> MaskResult:
    return MaskResult(select(wanda_scores(weight, stats.input_norms), sparsity, nm, per_row=True))
