"""Perplexity throughput on SmolLM2-135M: tokens/s and model-FLOP utilisation of the evaluation.

    python bench/eval.py [--windows 16] [--seqlen 1024]

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

from peak import gemm_gflops, load_smollm2  # noqa: E402

from ebft_engine.data import evaluation_tokens  # noqa: E402
from ebft_engine.evaluate import perplexity  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
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
    print(f"ppl: {result.ppl:.3f} on {result.windows} windows of {args.seqlen}")
    print(f"tokens_per_s: {result.tokens / seconds:.0f}")
    print(f"achieved_gflops: {achieved:.1f}")
    print(f"peak_bf16_gflops: {peak:.1f}")
    print(f"eval_mfu: {achieved / peak:.3f}")


if __name__ == "__main__":
    main()
