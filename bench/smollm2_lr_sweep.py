"""EBFT learning-rate sweep on SmolLM2-135M at 50% (Wanda masks), the numbers behind the demo preset's lr.

    python bench/smollm2_lr_sweep.py [--lrs 2e-4,1e-3,3e-3,1e-2] [--epochs 2]

Same protocol as bench/smollm2_table.py (16 windows of 1024 WikiText-2 test tokens; 32 × 512 self-generated
calibration tokens). One line per lr, ``lr <lr>: ppl <ebft>``; the last line is ``best lr: <lr>``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebft_engine import RunConfig, run  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", default="2e-4,1e-3,3e-3,1e-2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    found = {}
    for lr in (float(x) for x in args.lrs.split(",")):
        config = RunConfig.from_dict({
            "model": "smollm2-135m", "prune": {"method": "wanda", "sparsity": args.sparsity},
            "calib": {"source": "self", "nsamples": 32, "seqlen": 512},
            "ebft": {"epochs": args.epochs, "lr": lr, "batch_size": 8},
            "eval": {"source": f"file:{WIKITEXT}", "seqlen": 1024, "windows": 16},
            "runs_dir": str(ROOT / "runs")})
        for event in run(config):
            pass
        found[lr] = event.summary["ppl"].get("ebft", float("nan"))
        print(f"lr {lr:g}: ppl {found[lr]:.2f} (dense {event.summary['ppl'].get('dense', float('nan')):.2f})",
              flush=True)
    print(f"best lr: {min(found, key=found.get):g}")


if __name__ == "__main__":
    main()
