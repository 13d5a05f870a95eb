"""The memory planner against measurement, and its figures for 7B-class models on a 16 GB GPU.

    python bench/memory.py            # SmolLM2 demo preset measured in a fresh process (~5 min on 2 cores)
    python bench/memory.py --plan-only
    python bench/memory.py --block-7b  # one LLaMA-7B-width block's prune pass and EBFT steps (~5 min)

1. A fresh process runs the smollm2-demo preset; at each phase start it returns freed heap to the kernel
   (malloc_trim), resets the kernel's peak-RSS mark (/proc/self/clear_refs) and the CUDA peak counter, and at each phase end reads them (VmHWM; CUDA max
   allocated where a GPU is present). The planner's prediction for the same config is printed beside them.
2. The planner's device peak for LLaMA-7B, LLaMA-2-7B and Llama-3-8B at the paper's settings (256 x 1024
   calibration tokens, batch 8, bf16) on a 16 GB GPU.

The last line is ``planner_max_error: X%`` over the measured phases (target: within 15%).

3. ``--block-7b``: a LLaMA-7B-width block (hidden 4096, MLP 11008, 32 heads) through the block loop's steps on
   the CPU, every live tensor counted by bench/block_memory.py's TorchDispatchMode whatever the device: a
   SparseGPT baseline's prune pass, and EBFT from SparseGPT's masks (two training steps of 8 x 1024 tokens, so
   AdamW's state is live during the second), against the planner's device figure for a GPU run of the same
   settings. ``--nsamples`` calibration sequences (16: the streams are exact arithmetic, N x seqlen x hidden
   x 2 bytes each, and 256 would take an hour on 2 cores). Last line: ``planner_block_7b_error: X%`` (target 10%).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ebft_engine import RunConfig  # noqa: E402
from ebft_engine.device import Precision  # noqa: E402
from ebft_engine.planner import GiB, plan_memory  # noqa: E402

SEVEN_B = {
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000, max_position_embeddings=2048),
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       vocab_size=32000, max_position_embeddings=4096),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}
GPU16 = 16 * 10 ** 9


def demo_config() -> RunConfig:
    config = RunConfig.from_yaml(ROOT / "assets" / "presets" / "smollm2-demo.yaml")
    return config.with_overrides({"eval.source": f"file:{ROOT.parent / 'shared/data/wikitext-2-raw/wiki.test.raw'}",
                                  "runs_dir": str(Path(os.environ.get("TMPDIR", "/tmp")) / "ebft-memory-runs")})


def child() -> None:
    """Run the demo, measuring each phase's peak; print one JSON line with measured and predicted figures."""
    from ebft_engine import run
    from ebft_engine.models import load_config, resolve_source

    config = demo_config()
    cuda = torch.cuda.is_available()
    measured: dict[str, dict[str, float]] = {}
    plan_notice, cached = None, False
    for event in run(config):
        if event.kind == "phase_started":
            _reset_peak()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        elif event.kind == "phase_finished":
            entry = measured.setdefault(event.phase, {"host": 0.0, "device": 0.0})
            entry["host"] = max(entry["host"], _hwm())
            if cuda:
                entry["device"] = max(entry["device"], float(torch.cuda.max_memory_allocated()))
        elif event.kind == "notice" and event.text.startswith("memory plan"):
            plan_notice = event.text
        elif event.kind == "notice" and event.text.startswith("calibration:"):
            cached = "from the cache" in event.text
    summary = event.summary
    p = summary["precision"]
    precision = Precision(torch.device(p["device"]), getattr(torch, p["storage"]),
                          None if p["compute"] == "none" else getattr(torch, p["compute"]))
    source = resolve_source(config.model)
    plan = plan_memory(load_config(source), config, precision, calib_cached=cached, gguf=source.gguf_file is not None)
    predicted = {ph.phase: {"host": ph.host, "device": ph.device} for ph in plan.phases}
    print(json.dumps({"measured": measured, "predicted": predicted, "status": summary["status"],
                      "plan_notice": plan_notice, "cuda": cuda}))


def _reset_peak() -> None:
    """Hand freed heap back to the kernel (glibc keeps it otherwise, and RSS would carry one phase's garbage
    into the next), then reset the peak mark to what is resident now."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _hwm() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024.0
    return 0.0


def block_7b(nsamples: int) -> None:
    from bench.block_memory import measure

    shape = {k: v for k, v in SEVEN_B["LLaMA-7B"].items() if k in ("hidden_size", "intermediate_size",
                                                                    "num_attention_heads")}
    result = measure(shape, nsamples=nsamples, seqlen=1024, batch=8, steps=2)
    print(f"one LLaMA-7B-width block, {nsamples} x 1024 calibration tokens, batch 8, bf16 (GiB):")
    print(f"  {'phase':7} {'measured':>9} {'planned':>9} {'error':>7}")
    worst = 0.0
    for phase, r in result.items():
        error = (r["planned"] - r["measured"]) / r["measured"]
        worst = max(worst, abs(error))
        print(f"  {phase:7} {r['measured'] / GiB:9.3f} {r['planned'] / GiB:9.3f} {error:+7.1%}   (segments: "
              + ", ".join(f"{x / GiB:.3f}" for x in r["segments"]) + ")")
    print(f"planner_block_7b_error: {worst:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--block-7b", action="store_true", help="measure one LLaMA-7B-width block (see above)")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration sequences for --block-7b")
    args = parser.parse_args()
    if args.child:
        child()
        return
    if args.block_7b:
        block_7b(args.nsamples)
        return
    from transformers import LlamaConfig

    paper = RunConfig.from_yaml(ROOT / "assets" / "presets" / "llama-7b-paper.yaml")
    gpu = Precision(torch.device("cuda"), torch.bfloat16, torch.bfloat16)
    print("planned peaks at the paper's settings (256 x 1024 tokens, batch 8, bf16) on a 16 GB GPU:")
    worst_7b = 0.0
    for name, shape in SEVEN_B.items():
        plan = plan_memory(LlamaConfig(**shape), paper, gpu, device_capacity=GPU16)
        worst_7b = max(worst_7b, plan.peak_device)
        print(f"  {name:11} device {plan.peak_device / GiB:6.2f} GiB (ebft phase; activations on the "
              f"{plan.activations}), host {plan.peak_host / GiB:6.2f} GiB")
    print(f"7b_max_planned_device_gib: {worst_7b / GiB:.2f}")
    if args.plan_only:
        return
    proc = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result["plan_notice"])
    print(f"SmolLM2-135M demo preset, per phase (GiB):\n  {'phase':7} {'measured':>9} {'planned':>9} {'error':>7}")
    worst = 0.0
    kind = "device" if result["cuda"] else "host"
    for phase, m in result["measured"].items():
        if phase not in result["predicted"] or phase == "save":
            continue
        got, want = m[kind], result["predicted"][phase][kind]
        error = (want - got) / got
        worst = max(worst, abs(error))
        print(f"  {phase:7} {got / GiB:9.3f} {want / GiB:9.3f} {error:+7.1%}")
    print(f"planner_max_error: {worst:.1%}")


if __name__ == "__main__":
    main()
