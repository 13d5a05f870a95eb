"""The float16 + GradScaler paths a T4 or V100 takes, run on the CPU (torch has fp16 autocast and a CPU GradScaler):
EBFT's loss falls with every pruned weight zero after every step, its loss scale keeps small gradients off zero,
and LoRA trains through a scaler too."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ebft_engine.config import EbftConfig, LoraConfig
from ebft_engine.device import Precision
from ebft_engine.finetune import batch_mse, finetune_block
from ebft_engine.finetune.ebft import FP16_PROBE_SCALE, fp16_loss_scale
from ebft_engine.models import LlamaAdapter
from ebft_engine.sparsity import get_method

CPU = torch.device("cpu")
FP16 = Precision(CPU, torch.float32, torch.float16)  # float32 master weights, float16 autocast: needs a scaler


def _block(seqlen: int, sparsity: float, nsamples: int = 8):
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seqlen,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    adapter = LlamaAdapter(LlamaForCausalLM(config).eval())
    ids = torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))
    kwargs = adapter.block_kwargs(seqlen, CPU, torch.float32)
    call = lambda b, x: adapter.call_block(b, x, kwargs)  # noqa: E731
    with torch.no_grad():
        inputs = adapter.embed(ids)
        targets = call(adapter.blocks[0], inputs)
    block = copy.deepcopy(adapter.blocks[0])
    masks = {}
    for linear in adapter.linears(block).values():
        mask = get_method("magnitude").fn(linear.weight.data, None, sparsity, None).mask
        with torch.no_grad():
            linear.weight.mul_(mask)
        masks[linear.weight] = mask
    return block, call, inputs, targets, masks


def _model(layers: int):
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def test_fp16_training_lowers_the_loss_and_keeps_zeros_after_every_step():
    assert FP16.needs_scaler
    block, call, inputs, targets, masks = _block(32, 0.6)
    before = batch_mse(block, call, inputs, targets, FP16, 4)
    gen = finetune_block(block, call, inputs, targets, masks, EbftConfig(epochs=6, lr=1e-3, batch_size=2), FP16,
                         label="ebft", index=0, seed=0)
    steps = 0
    for _event in gen:  # the generator pauses after each optimiser step: the zeros must already be there
        steps += 1
        for weight, mask in masks.items():
            assert (weight[~mask] == 0).all(), f"a pruned weight moved at step {steps}"
    assert steps == 6 * 4
    assert batch_mse(block, call, inputs, targets, FP16, 4) < 0.5 * before


def test_the_fp16_loss_scale_keeps_a_well_reconstructed_blocks_gradients_off_zero():
    """A block pruned at 1% has a tiny error; at GradScaler's default scale many of its float16 gradients are
    zero, at the probed scale (the largest gradient near 2^14) almost none are."""
    block, call, inputs, targets, masks = _block(512, 0.01)
    x, y = inputs[:8], targets[:8]
    scale = fp16_loss_scale(block.requires_grad_(True), call, x, y, FP16)
    assert scale > FP16_PROBE_SCALE and scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())

    def zero_fraction(s: float) -> tuple[float, float]:
        with torch.autocast("cpu", dtype=torch.float16):
            out = call(block, x)
        (torch.mean((out.float() - y.float()) ** 2) * s).backward()
        kept = torch.cat([w.grad[m].flatten() for w, m in masks.items()])
        biggest = max(float(p.grad.abs().max()) for p in block.parameters())
        block.zero_grad(set_to_none=True)
        return float((kept == 0).float().mean()), biggest

    default_zeros, _ = zero_fraction(FP16_PROBE_SCALE)
    probed_zeros, biggest = zero_fraction(scale)
    assert default_zeros > 0.01 and probed_zeros < default_zeros / 10
    assert 2.0 ** 13 <= biggest <= 2.0 ** 15  # the target, with room below float16's 65504


def test_lora_trains_through_a_gradient_scaler_in_fp16(monkeypatch):
    from ebft_engine.finetune.lora import lora_adapters, train_lora

    used = []
    scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: used.append(1) or scale(self, loss))
    model = _model(layers=2)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    cfg = LoraConfig(lr=1e-2, epochs=6, budget="epochs", targets="q_proj,v_proj,down_proj")
    with lora_adapters(model, cfg) as peft_model:
        gen = train_lora(peft_model, ids, cfg, FP16, seed=0, budget_seconds=None)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            result = stop.value
    assert used and len(used) == result.steps == 6 * 2
    assert result.last_loss < result.first_loss


@pytest.mark.parametrize("start", [2.0 ** 16, 2.0 ** 60])  # GradScaler's default; one that overflows at once
def test_fp16_taylor_importance_is_scaled_then_unscaled(monkeypatch, start):
    """LLM-Pruner's importance pass in float16 scales its loss (halving while a gradient overflows) and unscales
    every group sum: the scores are the float32 pass's, to float16's precision."""
    from ebft_engine.sparsity import structured as st

    model = _model(layers=3)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    reference = st.taylor_importance(model, model.model.layers, [1], ids, Precision(CPU, torch.float32, None))[1]
    monkeypatch.setattr(st, "FP16_TAYLOR_SCALE", start)
    half = model.half()
    scores = st.taylor_importance(half, half.model.layers, [1], ids, Precision(CPU, torch.float16, torch.float16))[1]
    for field in ("heads", "kv_heads", "channels"):
        torch.testing.assert_close(getattr(scores, field), getattr(reference, field), rtol=2e-2, atol=0)
