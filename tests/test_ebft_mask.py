"""Learned masks (ebft-mask): the pattern is exact after every step, the masks move and pay on a tiny block,
a roll-back restores the prior, and the recovery runs and resumes through the engine."""
from __future__ import annotations

import copy

import pytest
import torch

from ebft_engine import run
from ebft_engine.config import EbftConfig
from ebft_engine.device import Precision
from ebft_engine.finetune import batch_mse, finetune_block
from ebft_engine.finetune.masks import SWAP, MaskLearner, limit_swaps, project
from ebft_engine.models import LlamaAdapter
from ebft_engine.sparsity import get_method
from ebft_engine.sparsity.registry import LayerStats

CPU = torch.device("cpu")
FP32 = Precision(CPU, torch.float32, None)


def _block(tiny_llama, calib_tokens, method: str, sparsity: float, nm):
    """Block 0 of the tiny LLaMA pruned by ``method``: (block, call, inputs, targets, masks, saliency)."""
    adapter = LlamaAdapter(tiny_llama)
    dense = adapter.blocks[0]
    kwargs = adapter.block_kwargs(calib_tokens.shape[1], CPU, torch.float32)
    call = lambda b, x: adapter.call_block(b, x, kwargs)  # noqa: E731
    sq = {}
    hooks = [layer.register_forward_pre_hook(
        lambda _m, a, n=name: sq.__setitem__(n, sq.get(n, 0) + (a[0].reshape(-1, a[0].shape[-1]) ** 2).sum(0)))
        for name, layer in adapter.linears(dense).items()]
    with torch.no_grad():
        inputs = adapter.embed(calib_tokens)
        targets = call(dense, inputs)
    for h in hooks:
        h.remove()
    block, masks = copy.deepcopy(dense), {}
    for name, linear in adapter.linears(block).items():
        stats = LayerStats(input_norms=sq[name] / calib_tokens.shape[0])
        mask = get_method(method).fn(linear.weight.data, stats, sparsity, nm).mask
        with torch.no_grad():
            linear.weight.mul_(mask)
        masks[linear.weight] = mask
    saliency = {n: v.sqrt() for n, v in sq.items()}
    block.dense_weights = {n: linear.weight.detach().clone() for n, linear in adapter.linears(dense).items()}
    return block, call, inputs, targets, masks, saliency, adapter


def _learn(setup, nm, check=None, epochs=8, lr=1e-3, swap=SWAP):
    """Train with learned masks as ebft-mask does (pruned weights start from their dense values); ``check(learner,
    step)`` runs after every step; returns (result, learner, events)."""
    block, call, inputs, targets, masks, saliency, adapter = setup
    learner = MaskLearner.for_block(adapter.linears(block), masks, saliency, nm, swap=swap,
                                    dense=block.dense_weights)

    def after(step, total):
        change = learner.after_step(step, total)
        if check is not None:
            check(learner, step)
        return change

    gen = finetune_block(block, call, inputs, targets, learner.grad_masks, EbftConfig(epochs=epochs, lr=lr,
                         batch_size=2), FP32, label="ebft-mask", index=0, seed=0, after_step=after)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    masks.update(learner.finish(result.rolled_back))  # the block's masks are the learned ones (as _adopt does)
    return result, learner, events


def _valid_nm(mask, n, m):
    return bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())


def _effective_weight_is_masked(layer):
    """What the block computes with: the masked forward's weight is zero outside the current mask."""
    x = torch.eye(layer.linear.in_features)
    bias = layer.linear.bias if layer.linear.bias is not None else 0
    with torch.no_grad():
        used = (layer.linear(x) - bias).T  # (out, in): column j is the weight of input j
    return bool((used[~layer.mask] == 0).all())


def test_learned_n_m_masks_are_valid_after_every_step(tiny_llama, calib_tokens):
    setup = _block(tiny_llama, calib_tokens, "wanda", 0.5, (2, 4))
    seen = []

    def check(learner, step):
        for layer in learner.layers:
            assert _valid_nm(layer.mask, 2, 4), f"step {step}: not 2:4"
            assert _effective_weight_is_masked(layer), f"step {step}: a pruned weight reaches the output"
        seen.append(step)

    result, learner, events = _learn(setup, (2, 4), check)
    assert seen == list(range(1, result.steps + 1))
    assert learner.mask_change() > 0  # the mask moved
    for weight, mask in setup[4].items():  # the final masks, baked in: valid 2:4 and zeros where pruned
        assert _valid_nm(mask, 2, 4) and (weight[~mask] == 0).all()
    assert any(e.mask_change and e.mask_change > 0 for e in events)
    assert all(e.mask_change == 0 for e in events if e.step > 0.75 * result.steps)  # settled before the end


@pytest.mark.parametrize("method", ["wanda", "magnitude"])  # a fixed count per row; one per layer
def test_unstructured_learned_masks_keep_the_exact_count_after_every_step(tiny_llama, calib_tokens, method):
    setup = _block(tiny_llama, calib_tokens, method, 0.6, None)
    priors = {w: m.clone() for w, m in setup[4].items()}

    def check(learner, step):
        for layer in learner.layers:
            if layer.per_row:
                assert torch.equal(layer.mask.sum(1), layer.prior.sum(1)), f"step {step}: a row's count moved"
            else:
                assert int(layer.mask.sum()) == int(layer.prior.sum()), f"step {step}: the layer's count moved"
            assert _effective_weight_is_masked(layer)

    _result, learner, _ = _learn(setup, None, check, lr=3e-3, swap=0.2)
    assert {layer.per_row for layer in learner.layers} == {method == "wanda"}
    assert learner.mask_change() > 0
    for weight, mask in setup[4].items():
        assert int(mask.sum()) == int(priors[weight].sum()) and (weight[~mask] == 0).all()


def test_learned_masks_lower_the_block_loss_below_fixed_mask_ebft(tiny_llama, calib_tokens):
    tokens = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    fixed = _block(tiny_llama, tokens, "wanda", 0.5, (2, 4))
    learned = _block(tiny_llama, tokens, "wanda", 0.5, (2, 4))
    block, call, inputs, targets, masks, _, _ = fixed
    gen = finetune_block(block, call, inputs, targets, masks, EbftConfig(epochs=8, lr=1e-3, batch_size=2), FP32,
                         label="ebft", index=0, seed=0)
    for _ in gen:
        pass
    fixed_loss = batch_mse(block, call, inputs, targets, FP32, 4)
    prior = {id(w): m.clone() for w, m in learned[4].items()}
    _learn(learned, (2, 4))
    for w, m in learned[4].items():
        assert (w[~m] == 0).all()
    learned_loss = batch_mse(learned[0], call, inputs, targets, FP32, 4)
    assert any(not torch.equal(m, prior[id(w)]) for w, m in learned[4].items())
    assert learned_loss < 0.99 * fixed_loss, (learned_loss, fixed_loss)  # 2.9% lower when written


def test_a_non_finite_loss_restores_the_pruned_weights_and_the_prior(tiny_llama, calib_tokens):
    setup = _block(tiny_llama, calib_tokens, "wanda", 0.5, (2, 4))
    block = setup[0]
    pruned = {k: v.clone() for k, v in block.state_dict().items()}
    poisoned = setup[3].clone()
    poisoned[5] = float("nan")  # a later batch: the masks have moved by then
    result, learner, _ = _learn((*setup[:3], poisoned, *setup[4:]), (2, 4), lr=3e-3, swap=None)
    assert result.rolled_back
    final = learner.finish(True)
    result.restore_pruned(block)
    for k, v in block.state_dict().items():
        assert torch.equal(v, pruned[k]), k
    assert all(torch.equal(final[layer.linear.weight], layer.prior) for layer in learner.layers)


def test_projection_and_swap_limits_keep_counts():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 16, generator=g)
    prior = project(torch.rand(6, 16, generator=g), torch.ones(6, 16, dtype=torch.bool)[:, :8].repeat(1, 2),
                    None, True)
    for nm, per_row in (((2, 4), False), (None, True), (None, False)):
        mask = project(torch.rand(6, 16, generator=g), prior, nm, per_row)
        new = project(scores, prior, nm, per_row)
        for share in (0.0, 0.25, 1.0):
            limited = limit_swaps(mask, new, scores, share, nm, per_row)
            if nm:
                assert _valid_nm(limited, 2, 4)
            elif per_row:
                assert torch.equal(limited.sum(1), mask.sum(1))
            else:
                assert int(limited.sum()) == int(mask.sum())
            flips = int((limited != mask).sum())
            assert flips <= int((new != mask).sum())
            if share == 0:
                assert flips == 0
            if share == 1.0:
                assert torch.equal(limited, new)


def test_ebft_mask_runs_through_the_engine(tiny_run_config):
    config = tiny_run_config.with_overrides({"recoveries": "ebft,ebft-mask,ebft-mask-gp",
                                             "prune": {"pattern": "2:4"}})
    events = list(run(config))
    summary = events[-1].summary
    assert events[-1].status == "finished", [e for e in events if e.kind == "notice"]
    assert {"ebft", "ebft-mask", "ebft-mask-gp"} <= set(summary["ppl"])
    steps = [e for e in events if e.kind == "step_loss"]
    assert all(e.mask_change is None for e in steps if e.label == "ebft")
    assert any(e.mask_change for e in steps if e.label == "ebft-mask")
    for label in ("ebft-mask", "ebft-mask-gp"):
        assert summary["actual_sparsity"][label] == pytest.approx(0.5)
    assert len(set(summary["mask_sha256"].values())) >= 2  # the learned masks are not the pruner's


def test_learned_masks_refuse_structured_pruning(tiny_run_config):
    from ebft_engine import ConfigError

    with pytest.raises(ConfigError, match="recoveries: ebft-mask-gp learns masks.*use ebft or ebft-gp"):
        tiny_run_config.with_overrides({"prune": {"method": "llm-pruner"}, "recoveries": "ebft,ebft-mask-gp"})


def test_limited_swaps_take_the_best_entering_and_the_weakest_leaving_weights():
    mask = torch.tensor([[True, True, False, False, False, False]])
    scores = torch.tensor([[0.1, 0.5, 0.9, 0.8, 0.7, 0.2]])
    new = project(scores, mask, None, True)  # the full projection swaps both kept weights
    assert new.tolist() == [[False, False, True, True, False, False]]
    one = limit_swaps(mask, new, scores, 0.5, None, True)  # a budget of one swap: 0.9 in, 0.1 out
    assert one.tolist() == [[False, True, True, False, False, False]]
    layer = limit_swaps(mask, new, scores, 0.5, None, False)  # the same, counted over the layer
    assert layer.tolist() == one.tolist()


def test_a_block_that_keeps_its_pruned_weights_reports_no_mask_change(tmp_path):
    """When learning raises a block's loss, the block keeps the pruner's weights and masks, and the notice about
    the mask says 0% (the tiny preset from SparseGPT's masks with 4 epochs: blocks fall back)."""
    from ebft_engine import RunConfig

    config = RunConfig.from_yaml("assets/presets/tiny-random.yaml").with_overrides({
        "prune": {"method": "sparsegpt"}, "recoveries": "ebft-mask", "baselines": [], "ebft": {"epochs": 4},
        "runs_dir": str(tmp_path)})
    notices = [e.text for e in run(config) if e.kind == "notice"]
    fell_back = [n for n in notices if "raised the reconstruction loss" in n]
    assert fell_back, "no block fell back: the test no longer exercises the roll-back"
    for text in fell_back:
        block = text.split(":")[0]
        assert f"{block}: ebft-mask changed 0.00% of the mask" in " ".join(notices)
