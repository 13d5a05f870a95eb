"""OWL (Yin et al. 2024, docs/methods/owl.md): a per-block sparsity allocation for any mask method, written
``owl-<method>``. Its options (``prune.owl_lambda``, ``prune.owl_m``) are registered here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import torch
from torch import nn

from ..config import PruneConfig
from ..events import Event, Notice
from ..loop import BlockMasks, BlockRun, check_cancelled, embed_calibration, forward
from ..registry import PruningEntry, add_pruning, option
from ..sparsity import StatsCollector
from ..sparsity.owl import OWL_BOUNDS, owl_spread, owl_whole_row_sparsities
from ..sparsity.wanda import wanda_scores
from .mask import MaskPruner


@dataclass(frozen=True)
class OwlOptions:
    owl_lambda: float = option(0.08, "OWL's spread of per-block sparsity (sparsity ± λ)", minimum=0,
                               fix="use a spread such as 0.08 (sparsity ± λ)", label="OWL λ (sparsity spread)")
    owl_m: float = option(5.0, "OWL's outlier threshold, in multiples of the mean Wanda score", minimum=0, strict=True,
                          fix="use an outlier threshold such as 5 (times the mean score)",
                          label="OWL M (outlier threshold)")


class OwlPruner:
    """A mask pruner whose per-block sparsities follow OWL (docs/methods/owl.md#outlier-ratio): each block's outlier
    ratio of Wanda scores over all its projections, from a pass over the dense model, spread ±λ around the
    target with the same mean, then rounded to whole weights per row of every layer with the remainders carried
    between blocks (docs/methods/owl.md#whole-weights-per-row), so that the run measures the target."""

    structured = False

    def __init__(self, inner: MaskPruner):
        self.inner, self.name, self.needs, self.cfg = inner, "owl-" + inner.name, inner.needs, inner.cfg

    def allocate(self, run: BlockRun, label: str, start: int) -> Generator[Event, None, list[float]]:
        # from the dense model, before any block of this variant is pruned or restored
        cfg, stream, ratios, shapes = self.cfg, embed_calibration(run), [], []
        for i, block in enumerate(run.adapter.blocks):
            check_cancelled(run)
            run.stage, run.where = "block", f"block {i} of OWL's dense pass"
            block.to(run.precision.device)
            stats = StatsCollector(frozenset({"input_norms"}), run.adapter.input_groups)
            linears = run.adapter.linears(block)
            shapes.append([tuple(layer.weight.shape) for layer in linears.values()])  # (rows, cols) each
            with stats.attach(linears):
                stream, _ = forward(run, block, stream, stats=stats)
            block.to("cpu")
            scores = torch.cat([wanda_scores(layer.weight.data, stats.layer_stats(name).input_norms).flatten()
                                for name, layer in linears.items()])
            ratios.append(100.0 * float((scores > cfg.owl_m * scores.mean()).sum()) / scores.numel())
        yield Notice("info", "OWL outlier ratios (%): " + ", ".join(f"{x:.2f}" for x in ratios))
        raw = owl_spread(ratios, cfg.sparsity, cfg.owl_lambda)
        lo, hi = min(OWL_BOUNDS[0], cfg.sparsity), max(OWL_BOUNDS[1], cfg.sparsity)
        clamped = [i for i, x in enumerate(raw) if not lo <= x <= hi]
        if clamped:
            yield Notice("warning", f"OWL: λ={cfg.owl_lambda:g} spreads the sparsity of block(s) "
                         f"{', '.join(map(str, clamped))} beyond [{lo:g}, {hi:g}] "
                         f"({', '.join(f'{raw[i]:.3f}' for i in clamped)}): clamped, and the other blocks "
                         f"take the difference so that the mean stays {cfg.sparsity:g}")
        sparsities = owl_whole_row_sparsities(ratios, cfg.sparsity, cfg.owl_lambda, shapes)
        yield Notice("info", f"OWL per-block sparsity for {label}: " +
                     ", ".join(f"{s:.3f}" for s in sparsities) + " (whole weights per row)")
        return sparsities

    def prune(self, run: BlockRun, block: nn.Module, index: int, stats: StatsCollector,
              sparsity: float) -> BlockMasks:
        return self.inner.prune(run, block, index, stats, sparsity)


add_pruning(PruningEntry("owl", "allocation", "OWL's outlier-weighted per-block sparsity, for any mask method",
                         OwlOptions, build=lambda inner, cfg: OwlPruner(inner), rank=5))
