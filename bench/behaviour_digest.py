"""Behaviour digests: the numbers a refactor must not change, recorded before and compared after.

    python bench/behaviour_digest.py --out bench/results/digest-before.json           # record
    python bench/behaviour_digest.py --compare bench/results/digest-before.json        # re-run and compare

Three runs on SmolLM2-135M (self-generated calibration, cached on first use, so both runs on one machine read
the same text): the ``smollm2-demo`` preset as shipped; every unstructured baseline with every recovery
(LoRA for a fixed number of epochs, not EBFT's wall-clock budget, which would differ between runs); and the
structured preset (LLM-Pruner) with every recovery, on fewer calibration sequences. ``--runs tiny`` does the
same on the in-process random model in seconds.

For each run it keeps every variant's perplexity, ``mask_sha256``, measured sparsity and per-block losses. The
last line is ``digest_changed: N`` (values that differ beyond 1e-6 relative; 0 means behaviour unchanged).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebft_engine import RunConfig, run  # noqa: E402

WIKITEXT = f"file:{ROOT.parent / 'shared/data/wikitext-2-raw/wiki.test.raw'}"
EVERY_BASELINE = ["magnitude", "wanda", "sparsegpt", "sparsegpt-mask", "dsnot", "owl-wanda"]
FIXED_LORA = {"lora.budget": "epochs", "lora.epochs": 1}


def _configs(which: str) -> dict[str, RunConfig]:
    presets = ROOT / "assets" / "presets"
    if which == "tiny":
        base = RunConfig.from_yaml(presets / "tiny-random.yaml")
        return {
            "tiny-every-baseline": base.with_overrides({
                "baselines": EVERY_BASELINE, "recoveries": ["ebft", "ebft-gp", "lora"], "ebft.epochs": 2,
                **FIXED_LORA}),
            "tiny-structured": base.with_overrides({
                "prune.method": "llm-pruner", "prune.keep_first": 1, "prune.keep_last": 1, "baselines": [],
                "recoveries": ["ebft", "ebft-gp", "lora"], "ebft.epochs": 2, **FIXED_LORA}),
        }
    demo = RunConfig.from_yaml(presets / "smollm2-demo.yaml").with_overrides({"eval.source": WIKITEXT})
    return {
        "smollm2-demo": demo,
        "smollm2-every-baseline": demo.with_overrides({
            "baselines": EVERY_BASELINE, "recoveries": ["ebft", "ebft-gp", "lora"], "calib.nsamples": 16,
            "calib.seqlen": 256, "ebft.epochs": 1, "eval.windows": 8, **FIXED_LORA}),
        "smollm2-structured": RunConfig.from_yaml(presets / "smollm2-structured.yaml").with_overrides({
            "eval.source": WIKITEXT, "calib.nsamples": 16, "calib.seqlen": 256, "ebft.epochs": 1,
            "eval.windows": 32, **FIXED_LORA}),
    }


def _digest(config: RunConfig) -> dict:
    start = time.perf_counter()
    for event in run(config):
        if event.kind == "notice" and event.level in ("warning", "error"):
            print(f"  [{event.level}] {event.text}", flush=True)
    summary = event.summary
    if summary["status"] != "finished":
        raise SystemExit(f"run {summary['run_id']} ended {summary['status']}: {summary.get('error')}")
    return {
        "ppl": summary["ppl"], "mask_sha256": summary["mask_sha256"],
        "actual_sparsity": summary["actual_sparsity"],
        "block_losses": [[b["label"], b["index"], b.get("initial_loss"), b.get("final_loss"), b.get("sparsity")]
                         for b in summary["blocks"]],
        "seconds": round(time.perf_counter() - start, 1),
    }


def _compare(before, after, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after)):
            if key == "seconds":
                continue
            if key not in before or key not in after:
                out.append(f"{path}{key}: only {'before' if key in before else 'after'}")
            else:
                out += _compare(before[key], after[key], f"{path}{key}.")
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [line for i, (b, a) in enumerate(zip(before, after)) for line in _compare(b, a, f"{path}{i}.")]
    if isinstance(before, float) and isinstance(after, float):
        same = abs(before - after) <= 1e-6 * max(abs(before), abs(after), 1e-12)
        return [] if same else [f"{path[:-1]}: {before!r} -> {after!r}"]
    return [] if before == after else [f"{path[:-1]}: {before!r} -> {after!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--out", help="write the digests here")
    parser.add_argument("--compare", help="a digest file recorded before; re-run and list every difference")
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    args = parser.parse_args()
    configs = _configs(args.runs)
    if args.only:
        configs = {name: configs[name] for name in args.only.split(",")}
    digests = {}
    for name, config in configs.items():
        print(f"{name} ...", flush=True)
        digests[name] = _digest(config)
        print(f"  {digests[name]['seconds']} s  ppl {json.dumps(digests[name]['ppl'])}", flush=True)
        print(f"  mask_sha256 {json.dumps(digests[name]['mask_sha256'])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(digests, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        changed = [line for name in digests for line in _compare(before.get(name, {}), digests[name], f"{name}.")]
        for line in changed:
            print(f"changed: {line}")
        print(f"digest_changed: {len(changed)}")


if __name__ == "__main__":
    main()
