"""Masks: exact sparsity, N:M groups, Wanda's definition, SparseGPT's reconstruction error."""
from __future__ import annotations

import pytest
import torch

from ebft_engine import registry
from ebft_engine.config import PruneConfig
from ebft_engine.sparsity.dsnot import DSNOT_INITS
from ebft_engine.sparsity import LayerStats, StatsCollector, available_methods, get_method, prune_count
from ebft_engine.sparsity.wanda import wanda_scores

ROWS, COLS = 24, 64


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, COLS, generator=g)
    x = torch.randn(6, 40, COLS, generator=g) * torch.linspace(0.1, 3, COLS)  # uneven input scales
    flat = x.reshape(-1, COLS)
    stats = LayerStats(input_norms=(flat ** 2).sum(0) / x.shape[0], hessian=2 / x.shape[0] * flat.T @ flat,
                       token_mean_sum=flat.sum(0) / x.shape[0], token_var=flat.var(0, unbiased=False))
    return weight, stats, flat


# Every registered method, with each set of options that changes what it reads (DSnoT: its initial method).
METHOD_CASES = [(name, PruneConfig(dsnot_init=init) if get_method(name).needs_for else PruneConfig())
                for name in available_methods()
                for init in (DSNOT_INITS if get_method(name).needs_for else DSNOT_INITS[:1])]
CASE_IDS = [f"{name}-{cfg.dsnot_init}" if get_method(name).needs_for else name for name, cfg in METHOD_CASES]
STAT_FIELDS = {"input_norms": ("input_norms",), "hessian": ("hessian",), "moments": ("token_mean_sum", "token_var")}


def _run(name, cfg, weight, stats, sparsity, nm):
    """Call a method as the pipeline does, on an attention projection (which DSnoT refines by default), giving it
    only the statistics the registry says it reads: a method that reads more fails here."""
    needs = get_method(name).needs_with(cfg)
    assert needs <= set(STAT_FIELDS), f"{name} reads {sorted(needs - set(STAT_FIELDS))}: teach this test to make them"
    given = LayerStats(**{f: getattr(stats, f) for need in needs for f in STAT_FIELDS[need]})
    return get_method(name).fn(weight, given, sparsity, nm, layer="q_proj", cfg=cfg)


def _per_row(name, cfg):
    """Whether a method's unstructured sparsity is exact per row (Wanda's comparison group; DSnoT keeps its initial
    mask's count in every row) rather than per matrix."""
    return name == "wanda" or (name == "dsnot" and _per_row(cfg.dsnot_init, cfg))


def test_every_registered_method_can_be_chosen():
    """The config's list of methods is the registry's (plus the structured ones, which are not mask methods)."""
    assert set(available_methods()) == {e.name for e in registry.pruning_entries("mask")}


@pytest.mark.parametrize("method,cfg", METHOD_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_sparsity_is_exact(layer, method, cfg, sparsity):
    weight, stats, _ = layer
    result = _run(method, cfg, weight, stats, sparsity, None)
    assert result.mask.dtype == torch.bool and result.mask.shape == weight.shape
    pruned = int((~result.mask).sum())
    if _per_row(method, cfg):  # every row loses exactly int(cols * s)
        assert ((~result.mask).sum(1) == prune_count(COLS, sparsity)).all()
    else:
        assert pruned == prune_count(ROWS * COLS, sparsity)
    if result.weight is not None:
        assert result.weight.shape == weight.shape and (result.weight[~result.mask] == 0).all()


@pytest.mark.parametrize("method,cfg", METHOD_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_keeps_exactly_n_in_every_group(layer, method, cfg, n, m):
    weight, stats, _ = layer
    mask = _run(method, cfg, weight, stats, 1 - n / m, (n, m)).mask
    assert (mask.reshape(ROWS, COLS // m, m).sum(-1) == n).all()


def test_wanda_score_matches_definition(layer):
    weight, stats, flat = layer
    # S_ij = |W_ij| * ||X_j||_2 up to a constant factor: compare with the definition on the pooled tokens
    direct = weight.abs() * flat.norm(dim=0)
    scores = wanda_scores(weight, stats.input_norms)
    torch.testing.assert_close(scores / scores.max(), direct / direct.max(), rtol=1e-5, atol=1e-6)
    mask = get_method("wanda").fn(weight, stats, 0.5, None).mask
    # each row keeps exactly its top half by the direct score
    expected = direct >= direct.kthvalue(COLS // 2 + 1, dim=1, keepdim=True).values
    assert torch.equal(mask, expected)


def _recon_error(flat, weight, new_weight):
    return float(((flat @ weight.T - flat @ new_weight.T) ** 2).sum())


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_sparsegpt_reconstructs_better_than_magnitude(layer, sparsity, nm):
    weight, stats, flat = layer
    mag = weight * get_method("magnitude").fn(weight, stats, sparsity, nm).mask
    sgpt = get_method("sparsegpt").fn(weight, stats, sparsity, nm).weight
    assert _recon_error(flat, weight, sgpt) <= _recon_error(flat, weight, mag)


def test_sparsegpt_mask_variant_keeps_original_weights(layer):
    weight, stats, _ = layer
    result = get_method("sparsegpt-mask").fn(weight, stats, 0.5, None)
    assert result.weight is None  # mask only: the pipeline multiplies the original weights by it
    dead = torch.zeros(COLS, dtype=torch.bool)
    dead[[5, 17]] = True
    hessian = stats.hessian.clone()
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    result = get_method("sparsegpt-mask").fn(weight, LayerStats(hessian=hessian), 0.5, None)
    original = weight.clone()
    original[:, dead] = 0  # like the reference: dead input columns are zeroed, nothing else changes
    assert torch.equal(result.weight, original * result.mask) and torch.equal(result.dead_inputs, dead)


@pytest.mark.parametrize("sparsity,nm", [(0.5, (2, 4)), (0.5, (4, 8)), (0.5, None), (0.05, None)])
def test_sparsegpt_zeroes_dead_input_columns_and_says_which(layer, sparsity, nm):
    """The reference sets W[:, dead] = 0 where an input never fires (docs/methods/sparsegpt.md#dead-input-channels):
    the mask keeps its exact count, and the kept weights of dead columns, zero, lift the measured sparsity; the
    result names the columns."""
    weight, _, flat = layer
    dead = torch.zeros(COLS, dtype=torch.bool)
    dead[[0, 1, 2, 3, 9, 40]] = True
    flat = flat.clone()
    flat[:, dead] = 0
    stats = LayerStats(hessian=2 / 6 * flat.T @ flat)
    result = get_method("sparsegpt").fn(weight, stats, sparsity, nm)
    assert torch.equal(result.dead_inputs, dead)
    assert (result.weight[:, dead] == 0).all()
    if nm is None:
        assert int((~result.mask).sum()) == prune_count(ROWS * COLS, sparsity)
    else:
        assert (result.mask.reshape(ROWS, COLS // nm[1], nm[1]).sum(-1) == nm[0]).all()
    kept_dead = int((result.mask & dead).sum())
    if nm is None:  # a zero weight has zero saliency: the dead ones go first, and only a low target keeps some
        assert kept_dead == max(0, ROWS * int(dead.sum()) - prune_count(ROWS * COLS, sparsity))
    else:  # N:M keeps N of every group: a group with fewer than N live columns keeps dead ones (2:4's first)
        live = (~dead).reshape(-1, nm[1]).sum(1)
        assert kept_dead == ROWS * int((nm[0] - live).clamp_min(0).sum())
    assert int((result.weight == 0).sum()) == int((~result.mask).sum()) + kept_dead  # the excess is exactly those
    # the mask-only variant (the EBFT reference's copy) zeroes the dead columns too, and nothing else
    mask_only = get_method("sparsegpt-mask").fn(weight, stats, sparsity, nm)
    assert torch.equal(mask_only.dead_inputs, dead) and int((mask_only.mask & dead).sum()) == kept_dead
    original = weight.clone()
    original[:, dead] = 0
    assert torch.equal(mask_only.weight, original * mask_only.mask)
    # every channel live: nothing reported
    assert get_method("sparsegpt").fn(weight, layer[1], sparsity, nm).dead_inputs is None


def test_stats_collector_matches_direct_computation(tiny_llama, calib_tokens):
    from ebft_engine.models import LlamaAdapter

    adapter = LlamaAdapter(tiny_llama)
    block = adapter.blocks[0]
    hidden = adapter.embed(calib_tokens)
    captured = {}
    handle = block.mlp.down_proj.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach()))
    collector = StatsCollector(frozenset({"input_norms", "hessian"}))
    with torch.no_grad(), collector.attach(adapter.linears(block)):
        adapter.call_block(block, hidden, adapter.block_kwargs(hidden.shape[1], torch.device("cpu"), torch.float32))
        collector.count(hidden.shape[0])
    handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1])
    stats = collector.layer_stats("down_proj")
    torch.testing.assert_close(stats.input_norms, (x ** 2).sum(0) / hidden.shape[0])
    torch.testing.assert_close(stats.hessian, 2 / hidden.shape[0] * x.T @ x, rtol=1e-4, atol=1e-5)
    assert torch.equal(collector.layer_stats("k_proj").input_norms, collector.layer_stats("q_proj").input_norms)


# ---- SparseGPT against a plain, independent implementation of the paper's Algorithm 1 ---------------------

def _plain_sparsegpt(weight, hessian, sparsity, nm, blocksize, update=True, percdamp=0.01):
    """Frantar & Alistarh 2023, Algorithm 1, written out slowly in float64, one column at a time; with
    ``update=False`` the EBFT reference's copy (sunggo/EBFT lib/sparsegpt.py: the pruned entries of q are not
    zeroed, so no error is spread and W only loses its dead columns). Returns (keep-mask, new weights).

    Instead of the Cholesky shortcut it tracks the OBS inverse Hessian of the columns not yet processed
    explicitly: when column j is done, eliminating it from H_F⁻¹ gives H_{F∖j}⁻¹ (one Gaussian elimination
    step). The paper's Cholesky factor U of H⁻¹ is exactly that sequence: U_jj² = [H_{F_j}⁻¹]_jj and
    U_j,j: = [H_{F_j}⁻¹]_j,j: / U_jj, where F_j = {j, j+1, ...}. So the saliency w²/U_jj² is w²/d_j and the
    OBS update of the remaining columns is W[:, j:] -= (w - q)/d_j · [H_{F_j}⁻¹]_j,j:.

    Counting convention (the project's, documented in sparsegpt.py): each block of ``blocksize`` columns
    removes its share of ``int(rows·cols·s)`` so that the running total after the block is int(rows·cols_so_far·s).
    Ties in the saliency (the zeroed dead column's) go to the lower row-major position, as a stable sort's do.
    """
    W = weight.double().clone()
    rows, cols = W.shape
    H = hessian.double().clone()
    dead = [j for j in range(cols) if H[j, j] == 0]
    for j in dead:  # a column that never saw input: H_jj = 1, and its weights go (before any saliency)
        H[j, j] = 1.0
        W[:, j] = 0.0
    damp = percdamp * sum(float(H[j, j]) for j in range(cols)) / cols
    for j in range(cols):
        H[j, j] += damp
    Hinv = torch.linalg.inv(H)
    d = [0.0] * cols          # d[j] = [H_{F_j}⁻¹]_jj
    obs_rows = [None] * cols  # obs_rows[j] = [H_{F_j}⁻¹]_j,j:
    for j in range(cols):
        d[j] = float(Hinv[j, j])
        obs_rows[j] = Hinv[j, j:].clone()
        Hinv[j + 1:, j + 1:] -= torch.outer(Hinv[j + 1:, j], Hinv[j, j + 1:]) / Hinv[j, j]

    keep = torch.ones(rows, cols, dtype=torch.bool)
    removed = 0
    for j in range(cols):
        if nm is None and j % blocksize == 0:  # adaptive mask selection, once per block, on the updated W
            end = min(j + blocksize, cols)
            target = int(rows * end * sparsity + 1e-9)
            scored = [(float(W[r, c]) ** 2 / d[c], r, c) for r in range(rows) for c in range(j, end)]
            scored.sort()  # by saliency w²/U_cc² = w²/d_c, then by position
            for _, r, c in scored[:target - removed]:
                keep[r, c] = False
            removed = target
        if nm is not None and j % nm[1] == 0:  # N:M: in every row keep the N most salient of the next M
            n, m = nm
            for r in range(rows):
                group = sorted(range(j, j + m), key=lambda c: (float(W[r, c]) ** 2 / d[c], c))
                for c in group[:m - n]:
                    keep[r, c] = False
        if update:
            for r in range(rows):
                w = float(W[r, j])
                q = w if keep[r, j] else 0.0
                W[r, j:] -= (w - q) / d[j] * obs_rows[j]
    return keep, W * keep


SGPT_ROWS, SGPT_COLS, DEAD = 8, 192, 7  # 192 columns: one full 128-column block and a partial one


def _sgpt_problem(dead: bool):
    """Correlated inputs of uneven scale (so the OBS updates matter); with ``dead``, input channel DEAD is
    always zero."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(SGPT_ROWS, SGPT_COLS, generator=g)
    mixing = torch.eye(SGPT_COLS) + 0.3 * torch.randn(SGPT_COLS, SGPT_COLS, generator=g) / SGPT_COLS ** 0.5
    x = (torch.randn(4 * 128, SGPT_COLS, generator=g, dtype=torch.float64) @ mixing.double()
         * torch.linspace(0.2, 2.0, SGPT_COLS, dtype=torch.float64))
    if dead:
        x[:, DEAD] = 0
    hessian = (2 / 4 * x.T @ x).float()  # 4 sequences of 128 tokens, in float32 as the collector stores it
    return weight, hessian


@pytest.fixture(scope="module")
def sgpt_problem():
    return _sgpt_problem(dead=True)


def _sgpt_run(weight, hessian, sparsity, nm, blocksize, method):
    from ebft_engine.sparsity.sparsegpt import BLOCKSIZE, sparsegpt_prune

    if blocksize == BLOCKSIZE:  # the registered method, as the pipeline calls it
        result = get_method(method).fn(weight, LayerStats(hessian=hessian), sparsity, nm)
        return result.mask, result.weight
    return sparsegpt_prune(weight, hessian, sparsity, nm, update=method == "sparsegpt", blocksize=blocksize)


SGPT_CASES = [(0.5, None), (0.7, None), (0.3, None), (0.5, (2, 4)), (0.5, (4, 8))]


@pytest.mark.parametrize("blocksize", [128, 16])
@pytest.mark.parametrize("sparsity,nm", SGPT_CASES)
def test_sparsegpt_matches_plain_algorithm(sgpt_problem, sparsity, nm, blocksize):
    weight, hessian = sgpt_problem
    mask, new = _sgpt_run(weight, hessian, sparsity, nm, blocksize, "sparsegpt")
    keep, expected = _plain_sparsegpt(weight, hessian, sparsity, nm, blocksize)
    assert torch.equal(mask, keep), f"{int((mask != keep).sum())} mask entries differ"
    assert not (expected == weight.double() * keep).all()  # the OBS update did change the kept weights
    torch.testing.assert_close(new.double(), expected, rtol=1e-5, atol=1e-5)  # float32 vs float64


@pytest.mark.parametrize("sparsity,nm", SGPT_CASES)
def test_sparsegpt_mask_variant_matches_plain_algorithm(sparsity, nm):
    weight, hessian = _sgpt_problem(dead=False)
    mask, _ = _sgpt_run(weight, hessian, sparsity, nm, 128, "sparsegpt-mask")
    keep, _ = _plain_sparsegpt(weight, hessian, sparsity, nm, 128, update=False)
    assert torch.equal(mask, keep), f"{int((mask != keep).sum())} mask entries differ"


def test_sparsegpt_mask_variant_prunes_dead_columns_like_the_reference(sgpt_problem):
    weight, hessian = sgpt_problem
    mask, _ = _sgpt_run(weight, hessian, 0.5, (2, 4), 128, "sparsegpt-mask")
    keep, _ = _plain_sparsegpt(weight, hessian, 0.5, (2, 4), 128, update=False)
    assert not keep[:, DEAD].any()
    assert torch.equal(mask, keep)


def test_sparsegpt_factorises_in_float32_and_falls_back_to_float64(layer, monkeypatch):
    """As the reference: the damped Hessian is factorised in float32; float64 only where float32's Cholesky
    fails (consumer GPUs run float64 at 1/32-1/64 speed)."""
    from ebft_engine.sparsity import sparsegpt

    _, stats, _ = layer
    seen = []
    cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a, **k: seen.append(a.dtype) or cholesky(a, **k))
    U, _ = sparsegpt.inverse_hessian_factor(stats.hessian)
    assert seen == [torch.float32, torch.float32]

    def float32_fails(a, **k):
        seen.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("not positive-definite")
        return cholesky(a, **k)

    seen.clear()
    monkeypatch.setattr(torch.linalg, "cholesky", float32_fails)
    U64, _ = sparsegpt.inverse_hessian_factor(stats.hessian)
    assert seen == [torch.float32, torch.float64, torch.float64] and U64.dtype == torch.float32
    torch.testing.assert_close(U64, U, rtol=1e-4, atol=1e-6)
