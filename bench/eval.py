"""Perplexity throughput on SmolLM2-135M: tokens/s and model-FLOP utilisation of the evaluation.

    python bench/eval.py [--windows 16] [--seqlen 1024] [--breakdown]

Evaluates the dense model on the shared WikiText-2 test file with the engine's perplexity (block by block,
chunked cross-entropy). Model FLOPs per token: 2 × (the blocks' linear weights + the LM head) plus attention's
4·s·d per layer (causal not discounted). Utilisation = achieved ÷ the bf16 GEMM peak measured in the same run.
The last line is ``eval_mfu: X``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import best_ms, gemm_gflops, load_smollm2  # noqa: E402

from ebft_engine.data import evaluation_tokens  # noqa: E402
from ebft_engine.evaluate import perplexity  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time, with the same shapes, the attention kernel, the blocks' projections and the "
                             "LM head alone (forward), to show where the evaluation's time goes")
    args = parser.parse_args()
    precision, model, tokenizer, adapter = load_smollm2()
    config = model.config
    ids, _ = evaluation_tokens(tokenizer, f"file:{WIKITEXT}", args.seqlen)
    perplexity(adapter, ids, args.seqlen, precision, windows=1)  # warm-up
    start = time.perf_counter()
    result = perplexity(adapter, ids, args.seqlen, precision, windows=args.windows)
    seconds = time.perf_counter() - start
    linear = sum(l.weight.numel() for b in adapter.blocks for l in adapter.linears(b).values())
    head = adapter.lm_head.weight.numel()
    d_attn = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    flops_per_token = 2 * (linear + head) + 4 * args.seqlen * d_attn * config.num_hidden_layers
    achieved = result.tokens * flops_per_token / seconds / 1e9
    peak = gemm_gflops(torch.bfloat16)
    if args.breakdown:
        _breakdown(adapter, config, args.seqlen, result.tokens, seconds, peak)
    print(f"ppl: {result.ppl:.3f} on {result.windows} windows of {args.seqlen}")
    print(f"tokens_per_s: {result.tokens / seconds:.0f}")
    print(f"achieved_gflops: {achieved:.1f}")
    print(f"peak_bf16_gflops: {peak:.1f}")
    print(f"eval_mfu: {achieved / peak:.3f}")


@torch.no_grad()
def _breakdown(adapter, config, seqlen: int, tokens: int, seconds: float, peak: float) -> None:
    """The evaluation's time split, scaled from one EVAL_BATCH of windows to all ``tokens``: SDPA attention
    (causal, GQA) of every block, the seven projections of every block, and the LM head, each forward alone."""
    import torch.nn.functional as F

    from ebft_engine.evaluate import EVAL_BATCH

    heads, kv, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    hd = config.hidden_size // heads
    batch_tokens = EVAL_BATCH * seqlen
    scale = tokens / batch_tokens
    q = torch.randn(EVAL_BATCH, heads, seqlen, hd, dtype=torch.bfloat16)
    k = torch.randn(EVAL_BATCH, kv, seqlen, hd, dtype=torch.bfloat16)
    v = torch.randn(EVAL_BATCH, kv, seqlen, hd, dtype=torch.bfloat16)
    attn_ms = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads))
    block = adapter.blocks[0]
    weights = [l.weight.to(torch.bfloat16) for l in adapter.linears(block).values()]
    inputs = {w.shape[1]: torch.randn(batch_tokens, w.shape[1], dtype=torch.bfloat16) for w in weights}
    gemm_ms = best_ms(lambda: [inputs[w.shape[1]] @ w.T for w in weights])
    head = adapter.lm_head.weight.to(torch.bfloat16)
    x = torch.randn(batch_tokens, head.shape[1], dtype=torch.bfloat16)
    head_ms = best_ms(lambda: x @ head.T)
    total_ms = seconds * 1000
    attn_all, gemm_all, head_all = attn_ms * layers * scale, gemm_ms * layers * scale, head_ms * scale
    gemm_flops = 2 * batch_tokens * sum(w.numel() for w in weights)
    print(f"eval_ms: {total_ms:.0f}")
    print(f"attention_ms: {attn_all:.0f} ({attn_all / total_ms:.0%}; "
          f"{2 * batch_tokens * seqlen * heads * hd / attn_ms / 1e6:.0f} GFLOP/s on the causal FLOPs)")
    print(f"projections_ms: {gemm_all:.0f} ({gemm_all / total_ms:.0%}; {gemm_flops / gemm_ms / 1e6 / peak:.2f} of "
          "the peak)")
    print(f"lm_head_ms: {head_all:.0f} ({head_all / total_ms:.0%}; "
          f"{2 * batch_tokens * head.numel() / head_ms / 1e6 / peak:.2f} of the peak)")
    print(f"rest_ms: {max(total_ms - attn_all - gemm_all - head_all, 0):.0f} (norms, rotary, SiLU, casts, softmax "
          "and cross-entropy over the vocabulary)")


if __name__ == "__main__":
    main()
