"""OWL's per-block sparsities are whole weights per row (docs/methods/owl.md#whole-weights-per-row): a mask
method removes ``int(cols * s)`` of every row (or ``int(numel * s)`` of a layer), so a profile that is not a
whole count of weights per row measured below the target in every block (owl-wanda at 0.5 on tiny-random:
49.00%). The profile is now in whole steps per row with the remainders carried between blocks, and what is left
under one step goes to one block as a fraction, so an OWL run measures the target to within one weight per row
of one block (per-layer methods: one weight per layer of one block), never above it."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebft_engine import run
from ebft_engine.models import dense_shapes
from ebft_engine.models.loading import tiny_config
from ebft_engine.sparsity import prune_count
from ebft_engine.sparsity.owl import OWL_BOUNDS, owl_sparsities, owl_whole_row_sparsities

OWL_LODS = st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=40)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_owl_runs_measure_their_target_within_one_weight_per_row(tiny_run_config, sparsity):
    """owl-wanda rounds per row and owl-magnitude per layer: both measure the target over the model to within one
    weight per row of one block (magnitude: one weight per layer), and every block but one measures its profile
    exactly."""
    config = tiny_run_config.with_overrides({
        "model": "tiny-random", "prune.method": "owl-wanda", "prune.sparsity": sparsity, "ebft.epochs": 0,
        "baselines": ["owl-wanda", "owl-magnitude"]})
    events = list(run(config))
    summary = events[-1].summary
    assert summary["status"] == "finished"
    shapes = dense_shapes(tiny_config())  # projection -> (in_features, out_features)
    total = 4 * sum(n_in * n_out for n_in, n_out in shapes.values())
    block_rows = sum(n_out for _n_in, n_out in shapes.values())
    for label, slack in (("owl-wanda", block_rows), ("owl-magnitude", len(shapes))):
        profile = summary["sparsity_profile"][label]
        assert len(set(profile)) > 1, profile  # OWL spread the blocks
        removed = summary["actual_sparsity"][label] * total
        assert 0 <= sparsity * total - removed < slack, (label, summary["actual_sparsity"][label])
        measured = [e.sparsity for e in events if e.kind == "block_finished" and e.label == label]
        off = [(m, p) for m, p in zip(measured, profile) if m != pytest.approx(p, abs=1e-12)]
        assert len(off) <= 1 and all(m <= p + 1e-6 for m, p in off), (label, measured, profile)


def _llama_block(hidden: int, kv: int, inter: int) -> list[tuple[int, int]]:
    """(rows, cols) of q, k, v, o, gate, up, down."""
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def test_the_tiny_random_profile_rounds_to_whole_rows_and_meets_the_target():
    """tiny-random's outlier ratios (the run that measured 49.00% at 0.5): OWL's profile 0.523, 0.510, 0.563,
    0.403 is 33.49, 32.64, 36.05, 25.81 of 64 per row; the floors leave two steps, which go to the largest
    remainders (blocks 3 and 1). At 0.7 (46.29, 45.44, 48.85, 38.61; floors 177) the target is 179.2 steps:
    two whole ones to blocks 2 and 3, and 0.2 of a step to the next in line, block 1."""
    shapes = [_llama_block(64, 32, 128)] * 4
    lods = [0.55, 0.56, 0.52, 0.64]
    assert owl_sparsities(lods, 0.5, 0.08) == pytest.approx([0.523333, 0.51, 0.563333, 0.403333], abs=1e-6)
    assert owl_whole_row_sparsities(lods, 0.5, 0.08, shapes) == [33 / 64, 33 / 64, 36 / 64, 26 / 64]
    s = owl_whole_row_sparsities(lods, 0.7, 0.08, shapes)
    assert [s[0], s[2], s[3]] == [46 / 64, 49 / 64, 39 / 64] and s[1] == pytest.approx(45.2 / 64, abs=1e-12)
    assert owl_whole_row_sparsities(lods, 0.5, 0.0, shapes) == [0.5] * 4  # whole already: unchanged
    assert owl_whole_row_sparsities(lods[:3], 0.0, 0.08, shapes[:3]) == [0.0] * 3


def _removed(s: float, layers: list[tuple[int, int]]) -> tuple[int, int]:
    """What a block at ``s`` loses, counted per row (Wanda) and per layer (magnitude, SparseGPT)."""
    return (sum(rows * prune_count(cols, s) for rows, cols in layers),
            sum(prune_count(rows * cols, s) for rows, cols in layers))


def _whole(x: float, g: int) -> bool:
    return abs(x * g - round(x * g)) <= 1e-9


def _check_whole_rows(lods, sparsity, lam, shapes):
    """The allocation's promises for any shapes: whole steps in every block but one, within the bounds rounded to
    whole steps, the target met to within one weight per row (per layer) of one block and never exceeded, unless
    the upper bound stops it. Returns the profile, OWL's profile within the same whole-step bounds and each
    block's step (None for OWL's: its profile came back as it is, no whole steps reaching the target)."""
    s = owl_whole_row_sparsities(lods, sparsity, lam, shapes)
    lo, hi = min(OWL_BOUNDS[0], sparsity), max(OWL_BOUNDS[1], sparsity)
    steps = [math.gcd(*(cols for _rows, cols in layers)) for layers in shapes]
    sizes = [sum(rows * cols for rows, cols in layers) for layers in shapes]
    weights = [n / sizes[0] for n in sizes]
    kmin = [min(math.ceil(lo * g - 1e-9), math.floor(sparsity * g + 1e-9)) for g in steps]
    kmax = [math.floor(hi * g + 1e-9) for g in steps]
    target = sparsity * sum(sizes)
    units = [n // g for n, g in zip(sizes, steps)]
    if sum(b * u for b, u in zip(kmax, units)) < target - max(units) / 2:
        assert s == owl_sparsities(lods, sparsity, lam, weights=weights)  # as before, for the method to round
        return s, None, steps
    assert sum(not _whole(x, g) for x, g in zip(s, steps)) <= 1  # whole weights in every row but one block's
    assert all(a / g - 1e-12 <= x <= hi + 1e-12 for x, a, g in zip(s, kmin, steps))
    per_row, per_layer = (sum(col) for col in zip(*(_removed(x, layers) for x, layers in zip(s, shapes))))
    stopped = all(x * g >= b - 1e-9 for x, b, g in zip(s, kmax, steps))  # every block at the upper bound
    assert per_row <= target + 1e-6 and (target - per_row < max(sum(r for r, _c in b) for b in shapes) or stopped)
    assert per_layer <= target + 1e-6 and (target - per_layer < max(len(b) for b in shapes) or stopped)
    grid = (max(a / g for a, g in zip(kmin, steps)), min(b / g for b, g in zip(kmax, steps)))
    owl = owl_sparsities(lods, sparsity, lam, grid, weights)
    assert abs(sum(x * n for x, n in zip(owl, sizes)) / sum(sizes) - sparsity) <= 1e-9
    return s, owl, steps


@settings(max_examples=400, deadline=None)
@given(lods=OWL_LODS, sparsity=st.floats(0, 0.999), lam=st.floats(0, 0.3),
       hidden=st.sampled_from([8, 12, 60, 64, 96, 576]), kv=st.integers(1, 8), ratio=st.floats(1, 4))
def test_equal_blocks_round_within_a_step_in_outlier_order_and_meet_the_target(lods, sparsity, lam, hidden, kv,
                                                                               ratio):
    shapes = [_llama_block(hidden, kv, int(hidden * ratio))] * len(lods)
    s, owl, steps = _check_whole_rows(lods, sparsity, lam, shapes)
    if owl is not None:
        assert all(abs(x - y) <= 1 / steps[0] + 1e-12 for x, y in zip(s, owl))
        for a, b in zip(owl, s):  # OWL's order (more outliers, lower sparsity) kept
            assert all(y <= b + 1e-12 for x, y in zip(owl, s) if x < a)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), lods=OWL_LODS, sparsity=st.floats(0, 0.999), lam=st.floats(0, 0.3),
       hidden=st.sampled_from([8, 60, 64, 96]))
def test_blocks_of_different_sizes_weigh_by_size(data, lods, sparsity, lam, hidden):
    """A structurally pruned model's blocks differ (fewer heads, narrower MLPs): OWL's profile has the target as
    its mean weighted by block size, and the whole counts meet it over all the blocks' weights."""
    shapes = [_llama_block(hidden, data.draw(st.integers(1, 8)), data.draw(st.integers(1, 4 * hidden)))
              for _ in lods]
    _check_whole_rows(lods, sparsity, lam, shapes)


def test_a_layer_too_narrow_for_whole_steps_keeps_owls_profile():
    """A down_proj with one input column prunes whole rows or none: no whole steps under the upper bound reach
    the target, so the profile goes to the method as it is (which rounds it per row, as before)."""
    shapes = [_llama_block(8, 2, 1)] * 2
    assert owl_whole_row_sparsities([1.0, 2.0], 0.5, 0.08, shapes) == owl_sparsities([1.0, 2.0], 0.5, 0.08)


def test_equal_weights_give_owls_plain_profile_bit_for_bit():
    lods = [0.75, 0.81, 0.83, 0.77, 0.5]
    for sparsity, lam in ((0.9, 0.2), (0.5, 0.08), (0.05, 0.1)):
        assert owl_sparsities(lods, sparsity, lam, weights=[1.0] * 5) == owl_sparsities(lods, sparsity, lam)
