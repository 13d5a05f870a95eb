"""SIGKILL-and-resume on SmolLM2-135M with the smollm2-demo preset, against an uninterrupted run.

    python bench/resume.py [--kill-after-block 14]

1. the preset runs to the end (the reference);
2. the same preset runs in a process that SIGKILLs itself the moment EBFT block K is finished
   (scripts/kill_after.py: no clean-up of any kind);
3. ``python -m ebft_engine run --resume RUN_DIR`` continues it.
It prints both summaries' perplexities and mask digests; the last line is ``resume_max_ppl_diff: X%``
(the largest relative perplexity difference; target below 0.1%).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebft_engine import RunConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-block", type=int, default=14)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ebft-resume-"))
    config = RunConfig.from_yaml(ROOT / "assets" / "presets" / "smollm2-demo.yaml").with_overrides({
        "eval.source": f"file:{ROOT.parent / 'shared/data/wikitext-2-raw/wiki.test.raw'}",
        "runs_dir": str(work / "killed")})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    t = time.perf_counter()
    reference_json = work / "reference.json"
    subprocess.run([sys.executable, "-m", "ebft_engine", "run", "--config", str(_write(work, config)),
                    "--runs-dir", str(work / "reference"), "--json-out", str(reference_json), "--quiet"],
                   cwd=ROOT, env=env, check=True)
    print(f"uninterrupted run: {time.perf_counter() - t:.0f} s", flush=True)

    t = time.perf_counter()
    cfg_json = work / "config.json"
    cfg_json.write_text(json.dumps(config.to_dict()))
    killed = subprocess.run([sys.executable, str(ROOT / "scripts" / "kill_after.py"), str(cfg_json),
                             "block_finished", "ebft", str(args.kill_after_block)], cwd=ROOT, env=env)
    (run_dir,) = (work / "killed").iterdir()
    status = json.loads((run_dir / "summary.json").read_text())
    print(f"killed run: exit {killed.returncode} (-9 is SIGKILL) after {time.perf_counter() - t:.0f} s; "
          f"summary.json says {status['status']!r} with ppl {status['ppl']}", flush=True)

    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ebft_engine", "run", "--resume", str(run_dir), "--quiet"],
                   cwd=ROOT, env=env, check=True)
    print(f"resumed run: {time.perf_counter() - t:.0f} s", flush=True)

    reference = json.loads(reference_json.read_text())
    resumed = json.loads((run_dir / "summary.json").read_text())
    print(f"{'':10} {'uninterrupted':>14} {'killed+resumed':>15}")
    worst = 0.0
    for label, ppl in reference["ppl"].items():
        other = resumed["ppl"][label]
        worst = max(worst, abs(other - ppl) / ppl)
        print(f"{label:10} {ppl:14.4f} {other:15.4f}")
    for label, digest in reference["mask_sha256"].items():
        same = "same" if resumed["mask_sha256"].get(label) == digest else "DIFFERENT"
        print(f"masks[{label}]: {digest} vs {resumed['mask_sha256'].get(label)} ({same})")
    print(f"resume_max_ppl_diff: {worst:.4%}")


def _write(work: Path, config: RunConfig) -> Path:
    import yaml

    path = work / "preset.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


if __name__ == "__main__":
    main()
