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
