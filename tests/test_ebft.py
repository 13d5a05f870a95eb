"""The block trainer lowers the reconstruction loss and keeps pruned weights at exactly zero."""
from __future__ import annotations

import copy

import pytest
import torch

from ebft_engine.config import EbftConfig
from ebft_engine.device import Precision
from ebft_engine.events import StepLoss
from ebft_engine.finetune import batch_mse, finetune_block
from ebft_engine.models import LlamaAdapter
from ebft_engine.sparsity import get_method

CPU = torch.device("cpu")


def _setup(tiny_llama, calib_tokens, precision):
    adapter = LlamaAdapter(tiny_llama)
    dense = adapter.blocks[0]
    kwargs = adapter.block_kwargs(calib_tokens.shape[1], CPU, torch.float32)
    call = lambda b, x: adapter.call_block(b, x, kwargs)  # noqa: E731
    with torch.no_grad():
        inputs = adapter.embed(calib_tokens)
        targets = call(dense, inputs)
    block = copy.deepcopy(dense)
    masks = {}
    for linear in adapter.linears(block).values():
        mask = get_method("magnitude").fn(linear.weight.data, None, 0.6, None).mask
        with torch.no_grad():
            linear.weight.mul_(mask)
        masks[linear.weight] = mask
    return block, call, inputs, targets, masks


def _train(block, call, inputs, targets, masks, precision, epochs=8):
    """Run the trainer to the end; after every optimiser step (each yielded StepLoss comes right after one)
    check that the pruned weights are exactly zero at that moment, not only after the final re-masking."""
    cfg = EbftConfig(epochs=epochs, lr=1e-3, batch_size=2)
    gen = finetune_block(block, call, inputs, targets, masks, cfg, precision, label="ebft", index=0, seed=0)
    events = []
    try:
        while True:
            events.append(next(gen))
            _assert_pruned_are_zero(masks, f"after step {events[-1].step}")
    except StopIteration as stop:
        return stop.value, events


def _assert_pruned_are_zero(masks, when):
    for weight, mask in masks.items():
        leaked = int((weight.detach()[~mask] != 0).sum())
        assert leaked == 0, f"{leaked} pruned weights of a {tuple(weight.shape)} matrix are nonzero {when}"


def test_ebft_lowers_block_loss_and_keeps_zeros(tiny_llama, calib_tokens):
    precision = Precision(CPU, torch.float32, None)
    block, call, inputs, targets, masks = _setup(tiny_llama, calib_tokens, precision)
    before = batch_mse(block, call, inputs, targets, precision, 4)
    norm_before = block.input_layernorm.weight.clone()
    result, events = _train(block, call, inputs, targets, masks, precision)
    after = batch_mse(block, call, inputs, targets, precision, 4)
    assert result.initial_loss == pytest.approx(before, rel=1e-5) and not result.rolled_back
    assert after < 0.7 * before
    assert len(events) == result.steps == 8 * 4 and all(isinstance(e, StepLoss) for e in events)
    assert [e.step for e in events] == list(range(1, 33))
    for weight, mask in masks.items():
        assert (weight[~mask] == 0).all()          # every pruned weight still exactly zero
        assert not torch.equal(weight[mask], weight[mask] * 0)  # and the kept ones trained
    assert not torch.equal(block.input_layernorm.weight, norm_before)  # norms train too


def test_ebft_under_bf16_autocast_keeps_zeros(tiny_llama, calib_tokens):
    precision = Precision(CPU, torch.bfloat16, torch.bfloat16)
    block, call, inputs, targets, masks = _setup(tiny_llama, calib_tokens, precision)
    before = batch_mse(block, call, inputs, targets, precision, 4)
    _train(block, call, inputs, targets, masks, precision, epochs=4)
    assert batch_mse(block, call, inputs, targets, precision, 4) < before
    for weight, mask in masks.items():
        assert (weight[~mask] == 0).all()


def test_non_finite_loss_rolls_back_to_pruned_weights(tiny_llama, calib_tokens):
    precision = Precision(CPU, torch.float32, None)
    block, call, inputs, targets, masks = _setup(tiny_llama, calib_tokens, precision)
    pruned = {k: v.clone() for k, v in block.state_dict().items()}
    poisoned = targets.clone()
    poisoned[3] = float("nan")
    result, _ = _train(block, call, inputs, poisoned, masks, precision)
    assert result.rolled_back
    for k, v in block.state_dict().items():
        assert torch.equal(v, pruned[k])
