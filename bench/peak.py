"""Matrix-multiplication peak of this machine: the yardstick for the utilisation figures.

    python bench/peak.py [--size 2048] [--seconds 3]

Prints bf16 and fp32 GEMM GFLOP/s (the best of several timed windows); the last line is ``peak_bf16_gflops: X``.
"""
from __future__ import annotations

import argparse
import time

import torch


def gemm_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0, device: str = "cpu") -> float:
    """Best sustained GFLOP/s of size×size matmuls in ``dtype`` over a few windows of ~seconds/3 each."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.matmul(a, b, out=out)
            n += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size ** 3 * n / (time.perf_counter() - start) / 1e9)
    return best


def best_ms(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (after one warm-up call), in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def load_smollm2():
    """(precision, model, tokenizer, adapter) for SmolLM2-135M on the CPU, as the engine loads it."""
    from ebft_engine.device import pick_precision
    from ebft_engine.models import LlamaAdapter, count_params, load_config, load_model, resolve_source

    source = resolve_source("smollm2-135m")
    precision = pick_precision(torch.device("cpu"), "auto", count_params(load_config(source)))
    model, tokenizer = load_model(source, precision.storage)
    return precision, model, tokenizer, LlamaAdapter(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    fp32 = gemm_gflops(torch.float32, args.size, args.seconds)
    print(f"peak_fp32_gflops: {fp32:.1f}")
    bf16 = gemm_gflops(torch.bfloat16, args.size, args.seconds)
    print(f"bf16/fp32: {bf16 / fp32:.2f}")
    print(f"peak_bf16_gflops: {bf16:.1f}")


if __name__ == "__main__":
    main()
