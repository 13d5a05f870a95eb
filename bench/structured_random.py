"""Does LLM-Pruner's Taylor importance matter? SmolLM2-135M pruned structurally (the smollm2-structured preset,
no recovery) with the importance from the gradient, then with seeded uniform random scores in its place.

    python bench/structured_random.py

Prints both perplexities (128-token windows, as in the preset); the last line is ``random_over_taylor: X``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebft_engine.config import RunConfig  # noqa: E402
from ebft_engine.pipeline import run  # noqa: E402
from ebft_engine.sparsity import structured as st  # noqa: E402


def pruned_ppl(config: RunConfig) -> float:
    for event in run(config):
        if event.kind == "run_finished":
            return event.summary["ppl"]["llm-pruner"]
    raise RuntimeError("the run did not finish")


def main() -> None:
    config = RunConfig.from_yaml(ROOT / "assets" / "presets" / "smollm2-structured.yaml").with_overrides(
        {"recoveries": ["ebft"], "ebft.epochs": 0, "runs_dir": "runs/bench-structured-random"})
    taylor = pruned_ppl(config)
    real = st.taylor_importance

    def random_scores(model, blocks, indices, ids, precision):
        g = torch.Generator().manual_seed(1)
        return {i: st.GroupScores(torch.rand(s.heads.shape, generator=g), torch.rand(s.kv_heads.shape, generator=g),
                                  torch.rand(s.channels.shape, generator=g))
                for i, s in real(model, blocks, indices, ids, precision).items()}

    st.taylor_importance = random_scores
    try:
        random = pruned_ppl(config)
    finally:
        st.taylor_importance = real
    print(f"taylor_ppl: {taylor:.2f}")
    print(f"random_ppl: {random:.2f}")
    print(f"random_over_taylor: {random / taylor:.2f}")


if __name__ == "__main__":
    main()
