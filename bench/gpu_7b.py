"""EBFT of LLaMA-7B-shaped blocks on an NVIDIA GPU capped at 16 GB: peak memory and seconds per block.

    python bench/gpu_7b.py                     # on a machine with a CUDA GPU (no internet needed)
    python bench/gpu_7b.py --shape tiny --device cpu   # the same code path in seconds, for a check here

A randomly initialised model with LLaMA-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) but
only ``--blocks`` blocks is saved to a temporary folder and run through the engine's own pipeline at the
paper's settings: Wanda 70%, 256 x 1024 calibration tokens, batch 8, 10 epochs, bf16. The process caps itself
at 16 GB with ``torch.cuda.set_per_process_memory_fraction`` (so the planner sees a 16 GB card), resets the
CUDA peak counter at each phase and reads it at each phase end. Random weights make the losses meaningless;
memory and time are what this measures. Seconds per block are extrapolated to LLaMA-7B's 32 blocks.

The last line is ``gpu_7b_minutes_32_blocks: X`` (the paper: about 30 minutes for the whole model).
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ebft_engine import RunConfig, run  # noqa: E402
from ebft_engine.planner import GiB  # noqa: E402

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000,
                     max_position_embeddings=2048),
    "tiny": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, vocab_size=32000,
                 max_position_embeddings=2048),
}
CAP_BYTES = 16 * 10 ** 9


def build_model(folder: Path, shape: str, blocks: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft_engine.models import byte_tokenizer

    config = LlamaConfig(num_hidden_layers=blocks, tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)  # byte ids (< 257) are valid ids of a 32000-token vocabulary


def write_text(path: Path, n_chars: int, seed: int) -> None:
    rng = random.Random(seed)
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
             for _ in range(3000)]
    text, size = [], 0
    while size < n_chars:
        w = rng.choice(words)
        text.append(w)
        size += len(w) + 1
    path.write_text(" ".join(text))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-7b")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nsamples", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU is visible: run with --device cpu --shape tiny for a check of the code path")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
        print(f"GPU: {torch.cuda.get_device_name(0)}, {total / GiB:.1f} GiB, capped at {CAP_BYTES / 1e9:.0f} GB")
    work = Path(tempfile.mkdtemp(prefix="ebft-gpu7b-"))
    build_model(work / "model", args.shape, args.blocks)
    tokens = args.nsamples * args.seqlen
    write_text(work / "calib.txt", tokens + 10_000, seed=1)  # byte tokens: one per character
    write_text(work / "eval.txt", 4 * 2048 + 100, seed=2)
    config = RunConfig.from_dict({
        "model": str(work / "model"), "prune": {"method": "wanda", "sparsity": 0.7},
        "calib": {"source": f"file:{work / 'calib.txt'}", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "ebft": {"epochs": args.epochs, "lr": 2e-4, "batch_size": 8},
        "eval": {"source": f"file:{work / 'eval.txt'}", "seqlen": 2048, "windows": 4},
        "device": args.device, "dtype": "bfloat16", "runs_dir": str(work / "runs"),
    })
    peaks: dict[str, float] = {}
    block_seconds: list[float] = []
    for event in run(config):
        if event.kind == "phase_started" and cuda:
            torch.cuda.reset_peak_memory_stats()
        elif event.kind == "phase_finished" and cuda:
            key = f"{event.phase}:{event.label}" if event.label else event.phase
            peaks[key] = torch.cuda.max_memory_allocated() / GiB
        elif event.kind == "block_finished" and event.label == "ebft":
            block_seconds.append(event.seconds)
            print(f"block {event.block}: {event.seconds:.1f} s, loss {event.initial_loss:.4g} -> "
                  f"{event.final_loss:.4g}", flush=True)
        elif event.kind == "notice":
            print(f"[{event.level}] {event.text}", flush=True)
    summary = event.summary
    if summary["status"] != "finished":
        sys.exit(f"run {summary['status']}")
    planned = summary["memory_plan"]["phases"]
    print("phase      measured peak  planned peak (device, GiB)")
    for key, gib in peaks.items():
        phase = key.split(":")[0]
        plan = planned.get(phase, {}).get("device_gib")
        print(f"  {key:12} {gib:8.2f}     {'' if plan is None else f'{plan:8.2f}'}")
    per_block = sum(block_seconds) / len(block_seconds)
    print(f"EBFT seconds per block: {per_block:.1f} (mean of {len(block_seconds)})")
    print(f"gpu_7b_peak_gib: {max(peaks.values(), default=0.0):.2f}")
    print(f"gpu_7b_minutes_32_blocks: {per_block * 32 / 60:.1f}")


if __name__ == "__main__":
    main()
