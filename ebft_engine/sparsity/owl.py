"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", arXiv 2310.05175): a per-block sparsity
allocation. Blocks with more outlier weights (Wanda scores above ``m`` times their mean) keep more weights,
spread ±λ around the target sparsity with the same mean. Pure arithmetic on the blocks' outlier ratios; the
dense pass that measures them is ``pruners.OwlPruner``."""
from __future__ import annotations

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


def owl_sparsities(lods: list[float], sparsity: float, lam: float,
                   bounds: tuple[float, float] = OWL_BOUNDS) -> list[float]:
    """Per-block sparsities from outlier ratios: OWL's spread (owl_spread), held within ``bounds`` while their
    mean stays exactly ``sparsity``: a block that would leave the bounds is clamped and what it cannot take
    goes to the blocks that can, equally (the profile closest to OWL's with that mean, clamp(s + c) for one
    shift c). Blocks keep their order: more outliers, lower sparsity. The bounds widen to hold the target
    itself (sparsity 0 gives 0 everywhere), so the mean is always met."""
    raw = owl_spread(lods, sparsity, lam)
    lo, hi = min(bounds[0], sparsity), max(bounds[1], sparsity)
    want = sparsity * len(raw)

    def total(c: float) -> float:
        return sum(min(max(s + c, lo), hi) for s in raw)

    # total(c) rises piecewise linearly in c, bending where a block meets a bound: find the piece holding the
    # target, then the shift on it exactly (the blocks strictly inside the bounds move with c, the rest stay).
    points = sorted({b - s for s in raw for b in (lo, hi)})
    below = [c for c in points if total(c) <= want]
    a = below[-1] if below else points[0]
    above = [c for c in points if c > a]
    probe = (a + above[0]) / 2 if above else a + 1.0
    free = [s for s in raw if lo < s + probe < hi]
    fixed = sum(min(max(s + probe, lo), hi) for s in raw if not lo < s + probe < hi)
    c = (want - fixed - sum(free)) / len(free) if free else a
    return [min(max(s + c, lo), hi) for s in raw]
