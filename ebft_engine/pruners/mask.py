"""The pruner of every registered mask method (sparsity/: magnitude, wanda, sparsegpt, sparsegpt-mask, dsnot):
the same sparsity in every block, each linear layer masked by the method's kernel."""
from __future__ import annotations

from typing import Generator

import torch
from torch import nn

from ..config import PruneConfig
from ..events import Event
from ..loop import BlockMasks, BlockRun
from ..sparsity import StatsCollector, get_method


class MaskPruner:
    """A registered mask method at the same sparsity in every block (unstructured or N:M)."""

    structured = False

    def __init__(self, name: str, cfg: PruneConfig):
        self.name, self.cfg, self.method = name, cfg, get_method(name)
        self.needs = self.method.needs_with(cfg)

    def allocate(self, run: BlockRun, label: str, start: int) -> Generator[Event, None, list[float]]:
        return [self.cfg.sparsity] * run.adapter.num_blocks
        yield  # a generator that emits nothing

    def prune(self, run: BlockRun, block: nn.Module, index: int, stats: StatsCollector,
              sparsity: float) -> BlockMasks:
        """Mask every linear layer of ``block`` in place (SparseGPT also updates the kept weights)."""
        device, out = run.precision.device, BlockMasks()
        for name, linear in run.adapter.linears(block).items():
            result = self.method.fn(linear.weight.data, stats.layer_stats(name), sparsity, self.cfg.nm, layer=name,
                                    cfg=self.cfg)
            with torch.no_grad():
                if result.weight is not None:
                    linear.weight.copy_(result.weight)
                linear.weight.mul_(result.mask.to(linear.weight.device))
            out.masks[linear.weight] = result.mask.to(device)
            if result.dead_inputs is not None:
                out.dead[name] = out.masks[linear.weight] & result.dead_inputs.to(device)
        return out
