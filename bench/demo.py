"""The smollm2-demo preset end to end, as a user runs it: seconds per phase.

    python bench/demo.py

Calibration text is generated once and cached (~/.cache/ebft_lab, or EBFT_CACHE_DIR): the output says whether
this run generated it. The last line is ``demo_seconds: X`` (target: at most 300 on 2 CPU cores).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebft_engine import RunConfig, run  # noqa: E402


def main() -> None:
    config = RunConfig.from_yaml(ROOT / "assets" / "presets" / "smollm2-demo.yaml")
    config = config.with_overrides({"eval.source": f"file:{ROOT.parent / 'shared/data/wikitext-2-raw/wiki.test.raw'}"})
    start = time.perf_counter()
    for event in run(config):
        if event.kind == "notice":
            print(f"[{event.level}] {event.text}", flush=True)
    total = time.perf_counter() - start
    for phase, seconds in event.summary["seconds"].items():
        print(f"{phase}: {seconds:.1f} s")
    print(f"ppl: {event.summary['ppl']}")
    print(f"demo_seconds: {total:.1f}")


if __name__ == "__main__":
    main()
