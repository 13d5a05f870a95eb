"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", arXiv 2310.05175): a per-block sparsity
allocation. Blocks with more outlier weights (Wanda scores above ``m`` times their mean) keep more weights,
spread ±λ around the target sparsity with the same mean, then rounded to whole weights per row
(owl_whole_row_sparsities) so that the model measures the target. Pure arithmetic on the blocks' outlier ratios and
shapes; the dense pass that measures them is ``pruners.OwlPruner``."""
from __future__ import annotations

import math

OWL_BOUNDS = (0.01, 0.99)  # the reference clamps a per-block sparsity <= 0 to 0.01; at most 0.99 keeps some weights


def owl_spread(lods: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-block sparsities before any bound (docs/methods/owl.md#per-block-sparsity): density
    D = r - mean(r) + (1 - S), r the
    outlier ratios scaled to [0, 2λ]; more outliers keep more weights; the mean is S. A wide spread leaves
    (0, 1): see owl_sparsities."""
    lo, hi = min(lods), max(lods)
    r = [0.0 if hi == lo else (x - lo) / (hi - lo) * 2 * lam for x in lods]
    mean = sum(r) / len(r)
    return [1 - (x - mean + 1 - sparsity) for x in r]


def owl_sparsities(lods: list[float], sparsity: float, lam: float, bounds: tuple[float, float] = OWL_BOUNDS,
                   weights: list[float] | None = None) -> list[float]:
    """Per-block sparsities from outlier ratios: OWL's spread (owl_spread), held within ``bounds`` while their
    mean stays exactly ``sparsity``: a block that would leave the bounds is clamped and what it cannot take
    goes to the blocks that can, equally (the profile closest to OWL's with that mean, clamp(s + c) for one
    shift c). Blocks keep their order: more outliers, lower sparsity. The bounds widen to hold the target
    itself (sparsity 0 gives 0 everywhere), so the mean is always met. ``weights``: each block's size, when
    blocks differ (a structurally pruned model): the mean weighted by them is ``sparsity``, so the model as a
    whole is; None (equal blocks, every LLaMA) is the plain mean, exactly as with equal weights."""
    raw = owl_spread(lods, sparsity, lam)
    lo, hi = min(bounds[0], sparsity), max(bounds[1], sparsity)
    w = [1.0] * len(raw) if weights is None else weights
    c = _shift(raw, w, (lo, hi), sparsity * sum(w))
    return [min(max(s + c, lo), hi) for s in raw]


def _shift(raw: list[float], w: list[float], bounds: tuple[float, float], want: float) -> float:
    """The shift c with ``Σ w·clamp(s + c) = want`` over the blocks' sparsities ``raw``, clamped to ``bounds``."""
    lo, hi = bounds

    def total(c: float) -> float:
        return sum(wi * min(max(s + c, lo), hi) for s, wi in zip(raw, w))

    # total(c) rises piecewise linearly in c, bending where a block meets a bound: find the piece holding the
    # target, then the shift on it exactly (the blocks strictly inside the bounds move with c, the rest stay).
    points = sorted({b - s for s in raw for b in (lo, hi)})
    below = [c for c in points if total(c) <= want]
    a = below[-1] if below else points[0]
    above = [c for c in points if c > a]
    probe = (a + above[0]) / 2 if above else a + 1.0
    return _shift_on_piece(raw, w, bounds, want, probe, a)


def _shift_on_piece(raw: list[float], w: list[float], bounds: tuple[float, float], want: float, probe: float,
                    a: float) -> float:
    """The exact shift on the piece of ``total`` that holds ``probe`` (which starts at ``a``): the blocks strictly
    inside the bounds there move with c, the others stay at their bound."""
    lo, hi = bounds
    inside = [lo < s + probe < hi for s in raw]
    fixed = sum(wi * min(max(s + probe, lo), hi) for s, wi, free in zip(raw, w, inside) if not free)
    moving = sum(wi for wi, free in zip(w, inside) if free)
    return (want - fixed - sum(wi * s for s, wi, free in zip(raw, w, inside) if free)) / moving if moving else a


def owl_whole_row_sparsities(lods: list[float], sparsity: float, lam: float, shapes: list[list[tuple[int, int]]],
                             bounds: tuple[float, float] = OWL_BOUNDS) -> list[float]:
    """OWL's per-block sparsities (owl_sparsities) in whole weights per row of every pruned layer, so that the
    model removes ``sparsity`` of all their weights as nearly as whole counts allow
    (docs/methods/owl.md#whole-weights-per-row). ``shapes[b]``: the ``(rows, cols)`` of each layer block b
    prunes (q/k/v/o and the MLP's, whose widths differ).

    A mask method removes ``int(cols * s)`` weights of every row (Wanda) or ``int(rows * cols * s)`` of a layer
    (magnitude, SparseGPT, ALPS): a block sparsity that is not a whole number per row loses the fraction in every
    row of every block, so the model measured below the target (owl-wanda at 0.5 on tiny-random: 49.00%). Here
    block b's sparsity is ``k_b / g_b``, ``g_b`` the gcd of its layers' input widths, so ``cols * s`` is whole in
    each of its layers and every rounding rule removes exactly ``s`` of each layer; one step of ``k_b`` is
    ``numel_b / g_b`` weights. OWL's profile is computed within the bounds rounded to whole steps (the lower one
    up, the upper one down; never above the target from below, so a target near 0 is still met), its mean
    weighted by the blocks' sizes (equal in a LLaMA); round_to_steps then carries the remainders between blocks.
    Should no whole steps within the bounds come near the target (a layer with a handful of input columns),
    OWL's profile is returned as it is, for the method to round as before."""
    steps = [math.gcd(*(cols for _rows, cols in layers)) for layers in shapes]
    sizes = [sum(rows * cols for rows, cols in layers) for layers in shapes]
    units = [n // g for n, g in zip(sizes, steps)]
    weights = [n / sizes[0] for n in sizes]  # 1.0 each for equal blocks: OWL's plain mean
    lo, hi = min(bounds[0], sparsity), max(bounds[1], sparsity)
    kmin = [min(math.ceil(lo * g - 1e-9), math.floor(sparsity * g + 1e-9)) for g in steps]
    kmax = [math.floor(hi * g + 1e-9) for g in steps]
    target = sparsity * sum(sizes)  # weights to remove over all the blocks
    if sum(n * u for n, u in zip(kmax, units)) < target - max(units) / 2:
        return owl_sparsities(lods, sparsity, lam, bounds, weights)  # whole steps under hi fall short
    grid = (max(a / g for a, g in zip(kmin, steps)), min(b / g for b, g in zip(kmax, steps)))
    profile = owl_sparsities(lods, sparsity, lam, grid, weights)
    return round_to_steps(profile, steps, units, (kmin, kmax), target, hi)


def round_to_steps(profile: list[float], steps: list[int], units: list[int], limits: tuple[list[int], list[int]],
                   target: float, hi: float) -> list[float]:
    """``profile`` (block b's sparsity ``s_b``) in whole steps ``k_b / steps[b]`` (``units[b]`` weights each,
    ``limits`` the least and most ``k_b``), removing ``target`` weights in all: each ``k_b`` starts at
    ``floor(steps[b] * s_b)``; the weights the floors leave over go, a whole step at a time, to the blocks with
    the largest remainders while a step fits (largest-remainder apportionment, weighted by the blocks' sizes);
    the rest, under one step, goes as a fraction of a step to the next block in line (never above ``hi``).

    Every block but that one removes exactly its sparsity whatever the method's rounding; that one loses under a
    weight per row (per-row methods) or per layer (per-layer methods), so a run measures the target to within
    one weight per row of one block, never above. With equal blocks and a profile within the limits whose total
    is the target (owl_whole_row_sparsities), each block stays within one step of ``s_b``, in its order."""
    want = [s * g for s, g in zip(profile, steps)]
    k = [min(max(math.floor(w + 1e-9), a), b) for w, a, b in zip(want, *limits)]
    gap = target - _apportion(k, want, units, limits, target)
    out = [n / g for n, g in zip(k, steps)]
    room = [i for i, (n, g) in enumerate(zip(k, steps)) if n < hi * g]
    if gap > 0 and room:
        i = max(room, key=lambda j: (want[j] - k[j], -j))
        out[i] = (k[i] + min(gap / units[i], hi * steps[i] - k[i])) / steps[i]
    return out


def _apportion(k: list[int], want: list[float], units: list[int], limits: tuple[list[int], list[int]],
               target: float) -> int:
    """Move the counts ``k`` (steps of ``units`` weights, within ``limits``) to the most whole steps that remove
    at most ``target`` weights: while over, a step down from the block furthest above its ``want``; then, while a
    step fits, a step up to the block furthest below it; the earlier block on a tie. Returns the weights removed."""
    kmin, kmax = limits
    removed = sum(n * u for n, u in zip(k, units))
    while removed > target + 1e-6:
        down = [i for i in range(len(k)) if k[i] > kmin[i]]
        if not down:
            return removed
        i = min(down, key=lambda j: (want[j] - k[j], j))
        k[i], removed = k[i] - 1, removed - units[i]
    while True:
        up = [i for i in range(len(k)) if k[i] < kmax[i] and removed + units[i] <= target + 1e-6]
        if not up:
            return removed
        i = max(up, key=lambda j: (want[j] - k[j], -j))
        k[i], removed = k[i] + 1, removed + units[i]
