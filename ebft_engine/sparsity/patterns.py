"""Turn importance scores into boolean keep-masks at an exact sparsity.

``True`` means the weight is kept. Ties are broken by position, so masks are deterministic: every mask is the
one a stable sort of the scores gives (NaN ranking above +inf), found by selection rather than by sorting
(tests/test_patterns.py holds the sorting references; bench/selection_speed.py times both).
Shapes follow ``nn.Linear.weight``: (out_features, in_features); N:M groups run along the input columns.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

SAMPLE = 1 << 14  # scores sampled to bracket a large layer's k-th smallest
SAMPLED_FROM = 1 << 18  # layers of at least this many scores look for it within the bracket
RANKED_UP_TO = 4  # N:M groups this small are ranked by pairwise comparisons; larger ones sorted (m = 8: even)
SPREAD = 2654435761  # a prime: positions i·SPREAD mod numel spread the sample over every row and column


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
    t = _kth_smallest(scores, k)  # (rows, 1)
    t_nan = torch.isnan(t)
    removed = scores <= t  # NaN is never <= t: kept, unless t itself is NaN
    if bool(t_nan.any()):  # every number of that row ranks below NaN; its NaNs are the ties
        removed |= t_nan
    counts = removed.count_nonzero().reshape(1) if rows == 1 else removed.sum(1, dtype=torch.int32)
    extra = counts - k  # ties at t beyond what the row must remove
    if bool(extra.any()):
        tied = extra.nonzero().squeeze(1)
        row, t_row = scores[tied], t[tied]
        ties = (row == t_row) | (torch.isnan(row) & t_nan[tied])
        from_right = ties.flip(1).cumsum(1, dtype=torch.int32).flip(1)  # ties at or after each column
        removed[tied] &= ~(ties & (from_right <= extra[tied].unsqueeze(1)))
    return removed.logical_not_()


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, 1): the k-th smallest of every row, NaN ranking last; a large single row goes through a bracket."""
    if scores.shape[0] == 1 and scores.numel() >= SAMPLED_FROM:
        t = _bracketed_kth(scores[0], k)
        if t is not None:
            return t.reshape(1, 1)
    return scores.kthvalue(k, dim=1, keepdim=True).values


def _bracketed_kth(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k-th smallest of 1-D ``flat``, or None when the sample's bracket misses it.

    A spread sample's quantiles around k/n give [lo, hi]; when the count below lo and the count within show the
    k-th smallest lies within, it is found among the few scores within (about 3%) instead of all of them.
    Otherwise (an unlucky sample, NaN at either end, heavy ties) None: the caller selects over everything.
    """
    n = flat.numel()
    positions = torch.arange(SAMPLE, device=flat.device).mul_(SPREAD).remainder_(n)
    sample = flat[positions]
    share = k / n
    centre, margin = int(share * SAMPLE), int(4 * (SAMPLE * share * (1 - share)) ** 0.5) + 8
    lo = sample.kthvalue(max(centre - margin, 0) + 1).values  # kthvalue ranks NaN last, as the sort does
    hi = sample.kthvalue(min(centre + margin, SAMPLE - 1) + 1).values
    under = flat < lo
    below = int(under.count_nonzero())
    within = flat[(flat <= hi).logical_and_(under.logical_not_())]  # empty if hi is NaN
    if below < k <= below + within.numel():
        return within.kthvalue(k - below).values
    return None


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores in every group of ``m`` consecutive input columns.

    ``scores`` (rows, cols), cols a multiple of m; the mask is (rows, cols) bool. The kept entries are exactly the
    first ``n`` of each group's stable descending sort: ties go by column (the lowest kept first) and NaN ranks
    above +inf (kept first). Groups of up to 4 are ranked by comparisons, larger ones (or any NaN) sorted.
    """
    rows, cols = scores.shape
    check_divisible(cols, m)
    groups = scores.reshape(rows, cols // m, m)
    if m <= RANKED_UP_TO and not bool(torch.isnan(groups).any()):
        return _ranked_in_groups(groups, n).reshape(rows, cols)
    idx = torch.argsort(groups, dim=2, stable=True, descending=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def _ranked_in_groups(groups: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, G, m) keep-mask: an entry is kept when fewer than ``n`` of its group outrank it (a higher score, or
    an equal one in an earlier column). One comparison per pair of columns i < j: without NaN, j outranks i
    exactly when it is higher, and i outranks j otherwise. For small m, cheaper than sorting m-long groups."""
    members = groups.unbind(-1)
    outranked = [torch.zeros_like(members[0], dtype=torch.uint8) for _ in members]
    for i, earlier in enumerate(members):
        for j in range(i + 1, len(members)):
            later_wins = members[j] > earlier
            outranked[i] += later_wins
            outranked[j] += later_wins.logical_not_()
    return torch.stack([count < n for count in outranked], -1)


def check_divisible(cols: int, m: int) -> None:
    if cols % m:
        raise ConfigError("prune.pattern", f"a layer has {cols} input columns, not a multiple of M={m}",
                          "choose an N:M pattern whose M divides the layer widths, or 'unstructured'")


def select(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """The one place a pattern is applied: N:M groups, else per-row or per-layer unstructured."""
    if nm is not None:
        return n_of_m(scores, *nm)
    return lowest_per_row(scores, sparsity) if per_row else lowest_in_layer(scores, sparsity)
