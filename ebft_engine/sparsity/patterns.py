"""Turn importance scores into boolean keep-masks at an exact sparsity.

``True`` means the weight is kept. Ties are broken by position (a stable sort), so masks are deterministic.
Shapes follow ``nn.Linear.weight``: (out_features, in_features); N:M groups run along the input columns.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a sparsity removes: ``int(total * sparsity)``, as the reference code does."""
    return int(total * sparsity + 1e-9)


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``int(cols*sparsity)`` lowest scores of every row (Wanda's comparison group)."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
        mask.scatter_(1, idx, False)
    return mask


def lowest_in_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``int(numel*sparsity)`` lowest scores of the whole matrix (magnitude)."""
    k = prune_count(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.argsort(scores.flatten(), stable=True)[:k]] = False
    return mask.view_as(scores)


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores in every group of ``m`` consecutive input columns."""
    rows, cols = scores.shape
    check_divisible(cols, m)
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.argsort(groups, dim=2, stable=True, descending=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def check_divisible(cols: int, m: int) -> None:
    if cols % m:
        raise ConfigError("prune.pattern", f"a layer has {cols} input columns, not a multiple of M={m}",
                          "choose an N:M pattern whose M divides the layer widths, or 'unstructured'")


def select(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """The one place a pattern is applied: N:M groups, else per-row or per-layer unstructured."""
    if nm is not None:
        return n_of_m(scores, *nm)
    return lowest_per_row(scores, sparsity) if per_row else lowest_in_layer(scores, sparsity)
