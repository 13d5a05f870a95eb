"""LLM-Pruner (Ma et al. 2023, docs/methods/llm-pruner.md): structured pruning that removes whole attention heads
and MLP channels; the importance scores and the choice of groups are ``sparsity/structured.py``. Its options
(keep_first, keep_last, taylor_samples, taylor_seqlen) are registered here."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator

from torch import nn

from ..config import PruneConfig
from ..device import non_finite
from ..events import Event, Notice
from ..loop import BlockMasks, BlockRun
from ..registry import PruningEntry, add_pruning, option
from ..sparsity import StatsCollector
from ..sparsity import structured as st


@dataclass(frozen=True)
class LlmPrunerOptions:
    keep_first: int = option(4, "structured pruning leaves the first N blocks whole (default 4)", minimum=0,
                             fix="use the number of leading blocks to leave whole, e.g. 4",
                             label="Structured: keep first blocks")
    keep_last: int = option(2, "structured pruning leaves the last N blocks whole (default 2)", minimum=0,
                            fix="use the number of final blocks to leave whole, e.g. 2",
                            label="Structured: keep last blocks")
    taylor_samples: int = option(10, "calibration sequences for llm-pruner's Taylor importance (default 10)",
                                 minimum=1, fix="use e.g. 10 sequences (LLM-Pruner's default)",
                                 label="Taylor importance: samples")
    taylor_seqlen: int = option(64, "tokens of each for the Taylor importance (default 64)", minimum=2,
                                fix="use e.g. 64 tokens (LLM-Pruner's default)", label="Taylor importance: tokens each")


class StructuredPruner:
    """LLM-Pruner (docs/methods/llm-pruner.md#taylor-importance): Taylor importance of heads and channels from the dense
    model, then each block between keep_first and keep_last shrinks by one ratio so the total removed is the
    target."""

    structured, needs = True, frozenset()

    def __init__(self, name: str, cfg: PruneConfig):
        self.name, self.cfg, self.scores = name, cfg, None

    def allocate(self, run: BlockRun, label: str, start: int) -> Generator[Event, None, list[float]]:
        cfg, n_blocks = self.cfg, run.adapter.num_blocks
        pruned = st.pruned_blocks(n_blocks, cfg.keep_first, cfg.keep_last)
        ratio = st.block_ratio(cfg.sparsity, [sum(d.values()) for d in run.dense_numel], pruned)
        if start < n_blocks:  # from the dense model, before any block of this variant is pruned or restored
            run.stage, run.where = "importance", "the importance pass of structured pruning"
            t = time.perf_counter()
            ids = run.calib_ids[:cfg.taylor_samples, :cfg.taylor_seqlen]
            try:
                self.scores = st.taylor_importance(run.model, run.adapter.blocks, pruned, ids, run.precision)
            except FloatingPointError:
                raise non_finite(run.precision, "the dense model's loss in the importance pass of structured "
                                                "pruning") from None
            yield Notice("info", f"structured pruning: Taylor importance of heads and channels in blocks "
                                 f"{pruned[0]}-{pruned[-1]} from {ids.shape[0]} x {ids.shape[1]} calibration "
                                 f"tokens in {time.perf_counter() - t:.1f} s")
        return [ratio if i in pruned else 0.0 for i in range(n_blocks)]

    def prune(self, run: BlockRun, block: nn.Module, index: int, stats: StatsCollector,
              sparsity: float) -> BlockMasks:
        """Remove the block's least important heads and channels (its matrices get smaller)."""
        if sparsity <= 0:
            return BlockMasks()
        kept = st.choose(block, self.scores[index], sparsity)
        st.shrink(block, kept)
        return BlockMasks(kept=kept.to_dict())


add_pruning(PruningEntry("llm-pruner", "structured", "LLM-Pruner: whole heads and MLP channels by Taylor importance",
                         LlmPrunerOptions, build=StructuredPruner, rank=10))
