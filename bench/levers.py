"""The speed levers weighed and not kept, each timed on SmolLM2-135M's shapes (random weights: timing only).

    python bench/levers.py [attention] [compile] [head]

- attention: causal GQA attention forward + backward of one EBFT batch (8 x 512, 9 query / 3 key-value heads of
  64) with PyTorch's default SDPA kernel, the math and flash backends, key/value heads repeated instead of GQA,
  fp32 flash, and an explicit bf16 attention with a float32 softmax;
- compile: EBFT steps (fp32 master weights, bf16 autocast, fused AdamW) on three blocks, eager and with
  ``torch.compile`` of the block call (its first step includes compiling; the others show recompiles);
- head: the evaluation's LM head + float32 cross-entropy over 4,096 tokens at chunks of 256, 1024, 2048 tokens.

The last line is ``levers_done: 1``; the figures are the lines above it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak import best_ms  # noqa: E402

B, S, H, KV, D, HIDDEN, FFN, VOCAB = 8, 512, 9, 3, 64, 576, 1536, 49152


def attention() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def qkv(dtype):
        return [torch.randn(B, n, S, D, dtype=dtype, requires_grad=True) for n in (H, KV, KV)]

    def gqa(dtype=torch.bfloat16):
        q, k, v = qkv(dtype)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float().sum().backward()

    def repeated(dtype):
        q, k, v = qkv(dtype)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()

    mask = torch.full((S, S), float("-inf")).triu(1)

    def explicit():
        q, k, v = qkv(torch.bfloat16)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        p = ((q @ k.transpose(-1, -2)).float() * D ** -0.5 + mask).softmax(-1).to(torch.bfloat16)
        (p @ v).float().sum().backward()

    print(f"attention_default_ms: {best_ms(gqa):.0f}")
    for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([backend]):
            print(f"attention_{name}_ms: {best_ms(gqa):.0f}")
    print(f"attention_repeated_kv_bf16_ms: {best_ms(lambda: repeated(torch.bfloat16)):.0f}")
    print(f"attention_repeated_kv_fp32_ms: {best_ms(lambda: repeated(torch.float32)):.0f}")
    print(f"attention_explicit_bf16_ms: {best_ms(explicit):.0f}")


def compile_block() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=H, num_key_value_heads=KV,
                      head_dim=D, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    x, target = torch.randn(B, S, HIDDEN), torch.randn(B, S, HIDDEN)
    pos = torch.arange(S)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)

    def call(block, x, cos, sin, pos):
        out = block(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
        return out[0] if isinstance(out, tuple) else out

    for name, fn in (("eager", call), ("compiled", torch.compile(call, dynamic=False))):
        for i in range(3):
            block = LlamaDecoderLayer(cfg, i).float().requires_grad_(True)
            opt = torch.optim.AdamW(block.parameters(), lr=1e-4, fused=True)
            times = []
            for _ in range(8):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = fn(block, x, cos, sin, pos)
                ((y.float() - target) ** 2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append((time.perf_counter() - start) * 1000)
            print(f"{name}_block{i}: first {times[0]:.0f} ms, steady {sum(times[2:]) / 6:.0f} ms/step", flush=True)


@torch.no_grad()
def head() -> None:
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN).to(torch.bfloat16)
    x, y = torch.randn(4096, HIDDEN), torch.randint(0, VOCAB, (4096,))

    def run(chunk):
        for s in range(0, 4096, chunk):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = x[s:s + chunk] @ weight.T
            F.cross_entropy(logits.float(), y[s:s + chunk], reduction="sum").item()

    for chunk in (256, 1024, 2048):
        print(f"head_chunk_{chunk}_ms: {best_ms(lambda: run(chunk)):.0f}")


def main() -> None:
    chosen = sys.argv[1:] or ["attention", "compile", "head"]
    for name in chosen:
        {"attention": attention, "compile": compile_block, "head": head}[name]()
    print("levers_done: 1")


if __name__ == "__main__":
    main()
