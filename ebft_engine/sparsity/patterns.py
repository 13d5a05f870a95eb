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
    """Keep-mask removing the ``int(cols*sparsity)`` lowest scores of every row (Wanda's comparison group).

    ``scores`` (rows, cols) of any real dtype; the mask is (rows, cols) bool. The removed entries are exactly the
    first ``k`` of each row's stable ascending sort: ties go by column (the lowest column is removed first) and NaN
    ranks above +inf (kept first).
    """
    return _remove_lowest(scores, prune_count(scores.shape[1], sparsity))


def lowest_in_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``int(numel*sparsity)`` lowest scores of the whole matrix (magnitude, ALPS).

    ``scores`` of any shape and real dtype; the mask has its shape. The removed entries are exactly the first ``k``
    of the flattened scores' stable ascending sort: ties go by flat (row-major) index, lowest removed first; NaN
    ranks above +inf.
    """
    k = prune_count(scores.numel(), sparsity)
    return _remove_lowest(scores.reshape(1, -1), k).view(scores.shape)


def _remove_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask removing the ``k`` lowest of every row of 2-D ``scores``, as the stable ascending sort orders them.

    Selection instead of a sort: t, the k-th smallest of a row (``kthvalue``, which also ranks NaN last), splits
    the row into ``s <= t`` (below or tied) and the kept rest. When a row has more entries tied at t than it must
    remove (``extra`` more), its last ``extra`` ties by column are kept: what a stable sort leaves behind.
    """
    rows, cols = scores.shape
    if k <= 0 or k >= cols:
        return torch.full_like(scores, k <= 0, dtype=torch.bool)
    t = scores.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1)
    t_nan = torch.isnan(t)
    removed = scores <= t  # NaN is never <= t: kept, unless t itself is NaN
    if bool(t_nan.any()):  # every number of that row ranks below NaN; its NaNs are the ties
        removed |= t_nan
    extra = removed.sum(1) - k  # ties at t beyond what the row must remove
    if bool(extra.any()):
        tied = extra.nonzero().squeeze(1)
        row, t_row = scores[tied], t[tied]
        ties = (row == t_row) | (torch.isnan(row) & t_nan[tied])
        from_right = ties.flip(1).cumsum(1, dtype=torch.int32).flip(1)  # ties at or after each column
        removed[tied] &= ~(ties & (from_right <= extra[tied].unsqueeze(1)))
    return removed.logical_not_()


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
