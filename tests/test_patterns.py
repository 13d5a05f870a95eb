"""Keep-masks from scores (ebft_engine/sparsity/patterns.py) select without a full sort, and come out bit-identical
to the stable sorts they replace: per layer and per row the first k of a stable ascending argsort go, per N:M group
the first n of a stable descending argsort stay. Ties go by position (lowest index removed first, kept first under
N:M), NaN ranks above +inf, -0.0 ties with 0.0; k = 0 and k = all; float32/64, float16, bfloat16 and integers;
the bracketed selection of large layers and its fallback; and ALPS's ADMM, which projects every iteration, follows
the same trajectory as with the sorting projection."""
from __future__ import annotations

import pytest
import torch

from ebft_engine.sparsity import lowest_in_layer, lowest_per_row, n_of_m, patterns, prune_count
from ebft_engine.sparsity import alps as alps_module

NAN, INF = float("nan"), float("inf")
SPARSITIES = [0.0, 0.01, 0.25, 0.5, 0.7, 0.999, 1.0]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def sorted_in_layer(scores, sparsity):
    """The reference: remove the first int(numel*sparsity) of the flattened stable ascending sort."""
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(scores.flatten(), stable=True)[:prune_count(scores.numel(), sparsity)]] = False
    return mask.view_as(scores)


def sorted_per_row(scores, sparsity):
    """The reference: remove the first int(cols*sparsity) of every row's stable ascending sort."""
    idx = torch.argsort(scores, dim=1, stable=True)[:, :prune_count(scores.shape[1], sparsity)]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)


def sorted_n_of_m(scores, n, m):
    """The reference: keep the first n of every group's stable descending sort."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.argsort(groups, dim=2, stable=True, descending=True)[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def scores_of(kind, shape, g):
    """Scores of one kind: continuous, integer-valued (heavy ties), all equal, or sprinkled with NaN, ±inf, ±0."""
    if kind == "random":
        return torch.randn(shape, generator=g)
    if kind == "integers":
        return torch.randint(0, 4, shape, generator=g).float()
    if kind == "equal":
        return torch.full(shape, 0.5)
    special = torch.tensor([NAN, INF, -INF, -0.0, 0.0])
    base = torch.randint(-2, 3, shape, generator=g).float()
    picked = special[torch.randint(0, len(special), shape, generator=g)]
    return torch.where(torch.rand(shape, generator=g) < 0.4, picked, base)


KINDS = ["random", "integers", "equal", "special"]
SHAPES = [(1, 1), (1, 9), (9, 1), (5, 12), (16, 64), (33, 40)]


def _cases(seed):
    g = torch.Generator().manual_seed(seed)
    for kind in KINDS:
        for shape in SHAPES:
            yield kind, shape, scores_of(kind, shape, g)


def _check(fn, ref, scores, *args):
    got, want = fn(scores, *args), ref(scores, *args)
    assert got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got, want), f"{fn.__name__}{args} differs at {(got != want).nonzero().tolist()[:8]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn,ref", [(lowest_in_layer, sorted_in_layer), (lowest_per_row, sorted_per_row)],
                         ids=["in_layer", "per_row"])
def test_unstructured_selection_equals_the_stable_sort(fn, ref, dtype):
    for _kind, _shape, scores in _cases(0):
        for sparsity in SPARSITIES:
            _check(fn, ref, scores.to(dtype), sparsity)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_n_of_m_equals_the_stable_sort(dtype):
    for _kind, _shape, scores in _cases(1):
        for m in (1, 2, 4, 8):
            wide = scores.repeat(1, m)  # a multiple of m columns, with ties across groups
            for n in range(m + 1):
                _check(n_of_m, sorted_n_of_m, wide.to(dtype), n, m)


def test_integer_scores_select_as_the_sort_does():
    scores = torch.randint(0, 3, (12, 16), generator=torch.Generator().manual_seed(2))
    for sparsity in SPARSITIES:
        _check(lowest_in_layer, sorted_in_layer, scores, sparsity)
        _check(lowest_per_row, sorted_per_row, scores, sparsity)
    _check(n_of_m, sorted_n_of_m, scores, 2, 4)


def test_ties_go_by_position():
    """Spelled out: equal scores lose their place lowest index first, and keep it lowest index first under N:M;
    NaN ranks above +inf (kept last to go), and -0.0 ties with 0.0."""
    row = torch.tensor([[1.0, 0.0, 1.0, -0.0, NAN, INF, 0.0, NAN]])
    assert lowest_in_layer(row, 0.25).tolist() == [[True, False, True, False, True, True, True, True]]
    assert lowest_per_row(row, 0.5).tolist() == [[False, False, True, False, True, True, False, True]]
    assert lowest_in_layer(row, 0.875).tolist() == [[False] * 7 + [True]]  # the last NaN stays
    assert n_of_m(torch.tensor([[2.0, 5.0, 5.0, 5.0]]), 2, 4).tolist() == [[False, True, True, False]]
    assert n_of_m(torch.tensor([[NAN, 1.0, INF, NAN]]), 1, 4).tolist() == [[True, False, False, False]]


def test_the_layer_mask_keeps_the_scores_shape_and_handles_transposed_input():
    scores = torch.randint(0, 5, (6, 10), generator=torch.Generator().manual_seed(4)).float()
    for sparsity in (0.3, 0.6):
        _check(lowest_in_layer, sorted_in_layer, scores.T, sparsity)
        _check(lowest_per_row, sorted_per_row, scores.T, sparsity)
        _check(lowest_in_layer, sorted_in_layer, scores.reshape(2, 3, 10), sparsity)
    assert lowest_in_layer(torch.empty(0, 4), 0.5).shape == (0, 4)


LARGE = (512, 520)  # 266,240 scores: over SAMPLED_FROM, so the layer goes through the bracket


@pytest.fixture
def bracket_calls(monkeypatch):
    """Counts the bracketed selections that found the k-th smallest (hit) and those that fell back (miss)."""
    calls = {"hit": 0, "miss": 0}
    bracketed = patterns._bracketed_kth

    def counted(flat, k):
        t = bracketed(flat, k)
        calls["hit" if t is not None else "miss"] += 1
        return t

    monkeypatch.setattr(patterns, "_bracketed_kth", counted)
    return calls


def test_large_layers_select_within_the_bracket_and_equal_the_sort(bracket_calls):
    g = torch.Generator().manual_seed(5)
    assert LARGE[0] * LARGE[1] >= patterns.SAMPLED_FROM
    column_scaled = torch.randn(LARGE, generator=g).abs() * torch.linspace(0, 3, LARGE[1])  # Wanda-like
    ascending = torch.randn(LARGE, generator=g).flatten().sort().values.view(LARGE)  # adversarial order
    for scores in (torch.randn(LARGE, generator=g), column_scaled, ascending):
        for sparsity in (0.001, 0.5, 0.7, 0.999):
            for dtype in (torch.float32, torch.bfloat16):
                _check(lowest_in_layer, sorted_in_layer, scores.to(dtype), sparsity)
    assert bracket_calls == {"hit": 24, "miss": 0}


def test_a_bracket_that_misses_falls_back_to_the_full_selection(bracket_calls):
    """NaN where the k-th smallest would be, and heavy ties: still the sort's mask, whichever path ran."""
    g = torch.Generator().manual_seed(6)
    with_nan = torch.randn(LARGE, generator=g)
    with_nan.view(-1)[::5] = NAN  # 20% NaN: at 90% the k-th smallest is NaN
    for scores in (with_nan, torch.randint(0, 3, LARGE, generator=g).float(), torch.zeros(LARGE)):
        for sparsity in (0.5, 0.9):
            _check(lowest_in_layer, sorted_in_layer, scores, sparsity)
    assert bracket_calls["miss"] >= 1 and bracket_calls["hit"] >= 1


def test_the_bracket_on_small_layers_equals_the_sort(monkeypatch, bracket_calls):
    """Every case above again with the bracket forced on (a sample larger than the layer, repeated positions)."""
    monkeypatch.setattr(patterns, "SAMPLED_FROM", 1)
    for _kind, _shape, scores in _cases(7):
        for sparsity in SPARSITIES:
            _check(lowest_in_layer, sorted_in_layer, scores, sparsity)
    assert bracket_calls["hit"] > 0 and bracket_calls["miss"] > 0


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_alps_admm_follows_the_sorting_projection_exactly(monkeypatch, nm):
    """ALPS projects onto the pattern every ADMM iteration: with the selection and with the stable sort, the
    whole trajectory (masks, weights, ρ schedule) is the same to the bit."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 2.0, 64)
    weight = torch.randn(24, 64, generator=g)
    q = alps_module.quadratic(2 / 4 * x.T @ x)
    fast = alps_module.admm(weight * q.scale, q, 0.6, nm, iterations=60)

    def sorting(Z, sparsity, nm):
        return sorted_in_layer(Z.abs(), sparsity) if nm is None else sorted_n_of_m(Z.abs(), *nm)

    monkeypatch.setattr(alps_module, "_project", sorting)
    slow = alps_module.admm(weight * q.scale, q, 0.6, nm, iterations=60)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]) and fast[2] == slow[2]
