"""Magnitude pruning: keep the largest |W| with one threshold per matrix (N:M: per group)."""
from __future__ import annotations

import torch

from .patterns import select
from .registry import LayerStats, MaskResult, register


@register("magnitude", description="largest |W| per matrix; needs no data", rank=0)
def magnitude(weight: torch.Tensor, stats: LayerStats, sparsity: float, nm, **_) -> MaskResult:
    return MaskResult(select(weight.abs().float(), sparsity, nm, per_row=False))
