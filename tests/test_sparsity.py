"""Masks: exact sparsity, N:M groups, Wanda's definition, SparseGPT's reconstruction error."""
from __future__ import annotations

import pytest
import torch

from ebft_engine.sparsity import LayerStats, StatsCollector, get_method, prune_count
from ebft_engine.sparsity.wanda import wanda_scores

ROWS, COLS = 24, 64


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, COLS, generator=g)
    x = torch.randn(6, 40, COLS, generator=g) * torch.linspace(0.1, 3, COLS)  # uneven input scales
    flat = x.reshape(-1, COLS)
    stats = LayerStats(input_norms=(flat ** 2).sum(0) / x.shape[0], hessian=2 / x.shape[0] * flat.T @ flat)
    return weight, stats, flat


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparsegpt-mask"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_sparsity_is_exact(layer, method, sparsity):
    weight, stats, _ = layer
    result = get_method(method).fn(weight, stats, sparsity, None)
    assert result.mask.dtype == torch.bool and result.mask.shape == weight.shape
    pruned = int((~result.mask).sum())
    if method == "wanda":  # Wanda compares within each row: every row loses exactly int(cols * s)
        assert ((~result.mask).sum(1) == prune_count(COLS, sparsity)).all()
    else:
        assert pruned == prune_count(ROWS * COLS, sparsity)
    if result.weight is not None:
        assert (result.weight[~result.mask] == 0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparsegpt-mask"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_keeps_exactly_n_in_every_group(layer, method, n, m):
    weight, stats, _ = layer
    mask = get_method(method).fn(weight, stats, 1 - n / m, (n, m)).mask
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


@pytest.mark.parametrize("sparsity,nm", [(0.5, (2, 4)), (0.5, (4, 8)), (0.5, None), (0.05, None)])
def test_sparsegpt_zeroes_dead_input_columns_and_says_which(layer, sparsity, nm):
    """The reference sets W[:, dead] = 0 where an input never fires (REFERENCE.md §3): the mask keeps its exact
    count, and the kept weights of dead columns, zero, lift the measured sparsity; the result names the columns."""
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
    # the mask-only variant keeps the original weights: nothing zeroed, nothing to report
    mask_only = get_method("sparsegpt-mask").fn(weight, stats, sparsity, nm)
    assert mask_only.dead_inputs is None
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
