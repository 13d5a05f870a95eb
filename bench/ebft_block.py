"""EBFT training throughput on one SmolLM2-135M block at the demo settings: tokens/s and model-FLOP utilisation.

    python bench/ebft_block.py [--block 10] [--epochs 4] [--nsamples 32] [--seqlen 512] [--batch-size 8] [--breakdown]

The block's inputs are the real activations of self-generated calibration text (cached after the first run);
the block is pruned with Wanda at 50% and trained with the engine's own trainer. Utilisation = achieved FLOP/s
÷ the bf16 GEMM peak measured in the same run (bench/peak.py). Model FLOPs per token: 6 × the block's linear
weights for a training step (forward + backward), 2 × for the initial-loss pass, plus attention's
12·s·d per token per step (4·s·d forward, causal not discounted). The last line is ``ebft_block_mfu: X``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import best_ms, gemm_gflops, load_smollm2  # noqa: E402

from ebft_engine.config import EbftConfig  # noqa: E402
from ebft_engine.data import calibration_tokens  # noqa: E402
from ebft_engine.finetune import finetune_block  # noqa: E402
from ebft_engine.sparsity import StatsCollector, get_method  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time, with the same shapes, the attention kernel and the projections' GEMMs "
                             "alone (forward + backward), to show where a step's time goes")
    args = parser.parse_args()

    precision, model, tokenizer, adapter = load_smollm2()
    ids = calibration_tokens(tokenizer, "self", args.nsamples, args.seqlen, 0, model=model, precision=precision)
    kwargs = adapter.block_kwargs(args.seqlen, precision.device, precision.storage)
    call = lambda block, x: adapter.call_block(block, x, kwargs)  # noqa: E731
    with torch.no_grad(), precision.autocast():
        hidden = adapter.embed(ids)
        for block in adapter.blocks[: args.block]:
            hidden = torch.cat([call(block, hidden[i:i + 8]).float() for i in range(0, len(hidden), 8)])
    block = adapter.blocks[args.block]
    stats = StatsCollector(frozenset({"input_norms"}))
    with torch.no_grad(), precision.autocast(), stats.attach(adapter.linears(block)):
        targets = torch.cat([call(block, hidden[i:i + 8]).float() for i in range(0, len(hidden), 8)])
        stats.count(len(hidden))
    masks = {}
    for name, linear in adapter.linears(block).items():
        mask = get_method("wanda").fn(linear.weight.data, stats.layer_stats(name), 0.5, None).mask
        linear.weight.data.mul_(mask)
        masks[linear.weight] = mask

    cfg = EbftConfig(epochs=args.epochs, lr=3e-3, batch_size=args.batch_size)
    start = time.perf_counter()
    steps = 0
    for _event in finetune_block(block, call, hidden, targets, masks, cfg, precision, label="bench", index=0,
                                 seed=0):
        steps += 1
    seconds = time.perf_counter() - start

    tokens_per_step = args.batch_size * args.seqlen
    linear_params = sum(l.weight.numel() for l in adapter.linears(block).values())
    d_attn = model.config.num_attention_heads * (model.config.hidden_size // model.config.num_attention_heads)
    train_flops = steps * tokens_per_step * (6 * linear_params + 12 * args.seqlen * d_attn)
    initial_flops = args.nsamples * args.seqlen * (2 * linear_params + 4 * args.seqlen * d_attn)
    achieved = (train_flops + initial_flops) / seconds / 1e9
    peak = gemm_gflops(torch.bfloat16)
    if args.breakdown:
        _breakdown(model.config, block, args.batch_size, args.seqlen, seconds / max(steps, 1), peak)
    print(f"steps: {steps} of batch {args.batch_size}x{args.seqlen} in {seconds:.2f} s")
    print(f"tokens_per_s: {steps * tokens_per_step / seconds:.0f}")
    print(f"achieved_gflops: {achieved:.1f}")
    print(f"peak_bf16_gflops: {peak:.1f}")
    print(f"ebft_block_mfu: {achieved / peak:.3f}")


def _breakdown(config, block, batch: int, seqlen: int, step_s: float, peak: float) -> None:
    """Where a training step's time goes: SDPA attention (causal, GQA) forward + backward, and the seven
    projections' GEMMs forward + backward (bf16, the block's own shapes), each with its GFLOP/s."""
    import torch.nn.functional as F

    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    tokens = batch * seqlen

    def attention():
        q = torch.randn(batch, heads, seqlen, hd, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, kv, seqlen, hd, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(batch, kv, seqlen, hd, dtype=torch.bfloat16, requires_grad=True)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads).float().sum().backward()

    weights = [l.weight.detach().to(torch.bfloat16) for l in (block.self_attn.q_proj, block.self_attn.k_proj,
               block.self_attn.v_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj,
               block.mlp.down_proj)]
    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1], dtype=torch.bfloat16) for w in weights}

    def gemms():  # y = x Wᵀ; backward: dx = dy W, dW = dyᵀ x
        for w in weights:
            x = inputs[w.shape[1]]
            y = x @ w.T
            _ = y @ w
            _ = y.T @ x

    attn_ms, gemm_ms = best_ms(attention, 5), best_ms(gemms, 5)
    attn_flops = 3 * 4 * tokens * seqlen * heads * hd / 2  # causal: half of QKᵀ and PV; backward twice forward
    gemm_flops = 6 * tokens * sum(w.numel() for w in weights)
    step_ms = step_s * 1000
    print(f"step_ms: {step_ms:.0f}")
    print(f"attention_fwd_bwd_ms: {attn_ms:.0f} ({attn_ms / step_ms:.0%} of a step; "
          f"{attn_flops / attn_ms / 1e6:.0f} GFLOP/s on the causal FLOPs)")
    print(f"projections_fwd_bwd_ms: {gemm_ms:.0f} ({gemm_ms / step_ms:.0%} of a step; "
          f"{gemm_flops / gemm_ms / 1e6:.0f} GFLOP/s, {gemm_flops / gemm_ms / 1e6 / peak:.2f} of the peak)")
    print(f"rest_ms: {max(step_ms - attn_ms - gemm_ms, 0):.0f} (norms, rotary, SiLU, casts, loss, AdamW)")


if __name__ == "__main__":
    main()
