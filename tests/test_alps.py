"""ALPS (docs/methods/alps.md) on a small synthetic layer: it reconstructs better than SparseGPT at the exact
target, its ADMM stops by the authors' rule, its penalty follows their schedule, and the conjugate-gradient refit
lowers the error on the support the ADMM chose. (The conformance checks every mask method passes, exact counts
at many sparsities and N:M patterns, are in test_sparsity.py.)"""
from __future__ import annotations

import pytest
import torch

from ebft_engine import registry
from ebft_engine.config import PruneConfig
from ebft_engine.sparsity import LayerStats, get_method, prune_count
from ebft_engine.sparsity import alps as alps_module
from ebft_engine.sparsity.alps import (CHECK_EVERY, ITERATIONS, RHO_CAP, SETTLE_AFTER, SETTLED, admm, alps_prune,
                                       next_rho, quadratic, refit)

ROWS, COLS, TOKENS, SEQUENCES = 32, 128, 512, 4


@pytest.fixture(scope="module")
def problem():
    """A layer whose inputs have correlated columns of uneven scale (where a weight update matters): the inputs
    X (tokens, in), the weights W (out, in) and the collector's Hessian 2/N Σ XᵀX (N counted in sequences)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(ROWS, COLS, generator=g)
    mixing = torch.eye(COLS) + 0.5 * torch.randn(COLS, COLS, generator=g) / COLS ** 0.5
    x = torch.randn(TOKENS, COLS, generator=g) @ mixing * torch.linspace(0.2, 2.0, COLS)
    return x, weight, 2 / SEQUENCES * x.T @ x


def _error(x, weight, new):
    """‖X(W − Ŵ)ᵀ‖² in float64."""
    return float(((x.double() @ (weight - new).double().T) ** 2).sum())


def _objective(hessian, weight, new, damp):
    """The damped quadratic ALPS minimises: tr((W − Ŵ)(H + λI)(W − Ŵ)ᵀ), in float64."""
    d = (weight - new).double()
    return float(((d @ hessian.double()) * d).sum() + damp * (d * d).sum())


CASES = [(0.5, None), (0.7, None), (0.5, (2, 4))]


@pytest.mark.parametrize("sparsity,nm", CASES, ids=["50%", "70%", "2:4"])
def test_alps_reconstructs_better_than_sparsegpt_at_the_exact_target(problem, sparsity, nm):
    x, weight, hessian = problem
    stats = LayerStats(hessian=hessian)
    result = get_method("alps").fn(weight, stats, sparsity, nm)
    sgpt = get_method("sparsegpt").fn(weight, LayerStats(hessian=hessian), sparsity, nm)
    assert result.weight is not None and result.weight.dtype == weight.dtype
    zeros = result.weight == 0
    assert torch.equal(zeros, ~result.mask)  # every pruned weight is zero, no kept one is
    if nm is None:  # one count for the whole layer (the authors' granularity), not per row
        assert int(zeros.sum()) == prune_count(ROWS * COLS, sparsity)
        assert len(set(zeros.sum(1).tolist())) > 1
    else:
        n, m = nm
        assert (result.mask.reshape(ROWS, COLS // m, m).sum(-1) == n).all()
    alps_error, sgpt_error = _error(x, weight, result.weight), _error(x, weight, sgpt.weight)
    assert alps_error < 0.9 * sgpt_error, f"ALPS {alps_error:.4g} vs SparseGPT {sgpt_error:.4g}"


@pytest.mark.parametrize("sparsity,nm", CASES, ids=["50%", "70%", "2:4"])
def test_admm_stops_by_its_rule(problem, sparsity, nm):
    """Checks every 3 iterations; it stops at the first check where the support did not move at all once ρ had
    been raised, or (after 30 iterations) moved by less than 0.03% of the kept weights; well before the cap."""
    _, weight, hessian = problem
    q = quadratic(hessian)
    _, _, trace = admm(weight * q.scale, q, sparsity, nm)
    assert trace.stop in ("settled", "small change") and trace.iterations < ITERATIONS
    assert trace.iterations % CHECK_EVERY == 0 and len(trace.changes) == trace.iterations // CHECK_EVERY
    raised = False  # replay the rule over the recorded checks: it fires at the last one and at no other
    for i, change in enumerate(trace.changes):
        settled = change == 0 and raised
        raised = raised or change > 0.005  # (a move of at most 0.5% raises ρ only once it was raised)
        small = (i + 1) * CHECK_EVERY > SETTLE_AFTER and change < SETTLED
        assert (settled or small) == (i == len(trace.changes) - 1), i
    assert trace.stop == ("settled" if settled else "small change")


def test_admm_stops_at_the_iteration_cap_and_the_option_sets_it(problem):
    _, weight, hessian = problem
    q = quadratic(hessian)
    _, _, trace = admm(weight * q.scale, q, 0.5, None, iterations=7)
    assert (trace.iterations, trace.stop, len(trace.changes)) == (7, "limit", 2)
    assert registry.option_defaults()["alps_iterations"] == ITERATIONS
    seen = []
    original = alps_module.admm

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[2])
        return out

    alps_module.admm = spy
    try:
        get_method("alps").fn(weight, LayerStats(hessian=hessian), 0.5, None, cfg=PruneConfig(alps_iterations=4))
        get_method("alps").fn(weight, LayerStats(hessian=hessian), 0.5, None, cfg=PruneConfig(alps_iterations=0))
    finally:
        alps_module.admm = original
    assert [(t.iterations, t.stop) for t in seen] == [(4, "limit"), (0, "limit")]


@pytest.mark.parametrize("rho,moved,raised,expected", [
    (0.1, 200, False, (0.13, True, "go")),       # > 10% of the kept 1000: ×1.3
    (0.1, 101, True, (0.13, True, "go")),
    (0.1, 100, False, (0.12, True, "go")),       # > 0.5%: ×1.2
    (0.1, 6, True, (0.12, True, "go")),
    (0.1, 5, True, (0.11, True, "go")),          # a small move once raised: ×1.1
    (0.1, 1, True, (0.11, True, "go")),
    (0.1, 5, False, (0.02, False, "restart")),  # a small move before ρ ever rose: /5, from the start again
    (0.1, 0, False, (0.02, False, "go")),        # no move before ρ rose: /5
    (0.1, 0, True, (0.1, True, "stop")),         # no move once raised: done
    (9e5, 500, True, (RHO_CAP, True, "go")),     # capped at 1e6
])
def test_penalty_schedule(rho, moved, raised, expected):
    new_rho, new_raised, action = next_rho(rho, moved, 1000, raised)
    assert new_rho == pytest.approx(expected[0]) and (new_raised, action) == expected[1:]


def test_a_restart_goes_back_to_the_initial_point(problem, monkeypatch):
    """"restart" (a small move before ρ ever rose) resets W, D and V: an ADMM that restarts at every check ends
    where it began, at the top-k of the normalised dense weights."""
    _, weight, hessian = problem
    q = quadratic(hessian)
    W0 = weight * q.scale
    monkeypatch.setattr(alps_module, "next_rho", lambda rho, moved, kept, raised: (rho / 5, False, "restart"))
    mask, W, trace = admm(W0, q, 0.5, None, iterations=6)
    top = get_method("magnitude").fn(W0, LayerStats(), 0.5, None).mask
    assert trace.stop == "limit" and torch.equal(mask, top) and torch.equal(W, W0 * top)


@pytest.mark.parametrize("sparsity,nm,iterations", [(0.7, None, ITERATIONS), (0.7, None, 6), (0.5, (2, 4), 6)])
def test_refit_lowers_the_error_on_the_admm_support(problem, sparsity, nm, iterations):
    """The CG refit keeps the ADMM's support and moves the kept weights toward the least-squares optimum on it:
    always lower in the quadratic it solves, and lower in the plain error too when the ADMM was cut short."""
    x, weight, hessian = problem
    q = quadratic(hessian)
    mask, admm_only, _ = alps_prune(weight, q, sparsity, nm, iterations=iterations, refine=False)
    mask_refit, refitted, _ = alps_prune(weight, q, sparsity, nm, iterations=iterations)
    assert torch.equal(mask, mask_refit) and torch.equal(refitted == 0, ~mask)
    before, after = (_objective(hessian, weight, w, q.damp) for w in (admm_only, refitted))
    assert after < before
    # the optimum on the support, row by row in float64: the refit gets most of the way there
    H = hessian.double() + q.damp * torch.eye(COLS, dtype=torch.float64)
    best = torch.zeros(ROWS, COLS, dtype=torch.float64)
    for r in range(ROWS):
        s = mask[r]
        best[r, s] = torch.linalg.solve(H[s][:, s], (weight[r].double() @ H)[s])
    optimum = _objective(hessian, weight, best, q.damp)
    assert after - optimum < 0.1 * (before - optimum)
    if iterations < ITERATIONS:
        assert _error(x, weight, refitted) < 0.99 * _error(x, weight, admm_only)


def test_refit_from_the_optimum_stays_there(problem):
    _, weight, hessian = problem
    q = quadratic(hessian)
    mask, _, _ = alps_prune(weight, q, 0.5, None, refine=False)
    W0 = weight * q.scale
    once = refit(W0 * mask, W0, q, mask, steps=200)
    torch.testing.assert_close(refit(once, W0, q, mask), once, rtol=1e-4, atol=1e-4)


def test_quadratic_is_normalised_damped_and_solves(problem):
    _, _, hessian = problem
    q = quadratic(hessian)
    damp = 0.01 * float(torch.diag(hessian).mean())
    assert q.damp == pytest.approx(damp) and q.values.dtype == torch.float32 and bool((q.values > 0).all())
    A = (hessian.double() + damp * torch.eye(COLS, dtype=torch.float64)) / q.scale.double() / q.scale.double()[:, None]
    torch.testing.assert_close(torch.diag(A), torch.ones(COLS, dtype=torch.float64))
    P = torch.randn(5, COLS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.times(P).double(), P.double() @ A, rtol=1e-4, atol=1e-4)
    expected = torch.linalg.solve(A + 0.3 * torch.eye(COLS, dtype=torch.float64), P.double().T).T
    torch.testing.assert_close(q.solve(P, 0.3).double(), expected, rtol=1e-3, atol=1e-3)


def test_eigendecomposition_falls_back_to_float64(problem, monkeypatch):
    _, _, hessian = problem
    seen = []
    eigh = torch.linalg.eigh

    def float32_fails(a, **k):
        seen.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return eigh(a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", float32_fails)
    q = quadratic(hessian)
    assert seen == [torch.float32, torch.float64] and q.vectors.dtype == torch.float32


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dead_inputs_and_an_empty_hessian(problem, nm):
    """An input that never fires (diag H = 0) keeps the damping alone; a Hessian of zeros (nothing seen) gives the
    identity quadratic, whose optimum is magnitude pruning: the kept weights are unchanged and the support close
    to the magnitude one (the ADMM on this non-convex problem need not reach the optimum). All at the exact count."""
    x, weight, _ = problem
    x = x.clone()
    x[:, [0, 5, 17]] = 0
    for hessian in (2 / SEQUENCES * x.T @ x, torch.zeros(COLS, COLS)):
        result = get_method("alps").fn(weight, LayerStats(hessian=hessian), 0.5, nm)
        assert bool(torch.isfinite(result.weight).all())
        if nm is None:
            assert int((~result.mask).sum()) == prune_count(ROWS * COLS, 0.5)
        else:
            assert (result.mask.reshape(ROWS, -1, 4).sum(-1) == 2).all()
    torch.testing.assert_close(result.weight, weight * result.mask)
    magnitude = get_method("magnitude").fn(weight, LayerStats(), 0.5, nm).mask
    assert float(((weight * ~result.mask) ** 2).sum()) < 1.05 * float(((weight * ~magnitude) ** 2).sum())


def test_shares_one_eigendecomposition_per_input(problem, monkeypatch):
    """q, k and v read one input: the quadratic is built once for them (LayerStats.derived)."""
    _, weight, hessian = problem
    built = []
    original = alps_module.quadratic
    monkeypatch.setattr(alps_module, "quadratic", lambda *a, **k: built.append(1) or original(*a, **k))
    stats = LayerStats(hessian=hessian)
    for _ in range(3):
        get_method("alps").fn(weight, stats, 0.5, None)
    assert len(built) == 1


def test_registered_with_its_statistics_and_option():
    entry = registry.pruning_entry("alps")
    assert entry.kind == "mask" and "alps" in registry.method_names() and "owl-alps" in registry.method_names()
    assert get_method("alps").needs == frozenset({"hessian"})
    assert PruneConfig(method="alps", alps_iterations="50").alps_iterations == 50
    with pytest.raises(Exception, match="prune.alps_iterations"):
        PruneConfig(method="alps", alps_iterations=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_weights_device(problem):
    _, weight, hessian = problem
    cuda = torch.device("cuda")
    result = get_method("alps").fn(weight.to(cuda), LayerStats(hessian=hessian.to(cuda)), 0.5, (2, 4))
    assert result.mask.device.type == "cuda" and result.weight.device.type == "cuda"
    cpu = get_method("alps").fn(weight, LayerStats(hessian=hessian), 0.5, (2, 4))
    assert float((result.mask != cpu.mask.to(cuda)).float().mean()) < 0.02
