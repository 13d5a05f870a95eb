"""What every recovery shares, and the pruned baseline itself: :class:`PruneOnly` (no training)."""
from __future__ import annotations

from typing import Generator, Iterator

import torch
from torch import nn

from ..events import Event
from ..loop import BlockMasks, BlockRun, forward
from ..sparsity import StatsCollector


class PruneOnly:
    """The pruned model as it is: statistics from the sparse model's stream when the pruner needs them."""

    phase, trains = "prune", False

    def active(self, cfg) -> bool:
        """Whether the run's settings leave it anything to do (``ebft.epochs: 0`` turns EBFT off)."""
        return True

    def labels(self, label: str) -> tuple[str, ...]:
        """The perplexities this variant reports."""
        return (label,)

    def begin(self, run: BlockRun, stream: torch.Tensor | None, start: int) -> None:
        pass

    def diverges(self, before: list[float]) -> bool:
        return False

    def targets(self, run: BlockRun, block: nn.Module, stream: torch.Tensor | None,
                stats: StatsCollector) -> torch.Tensor | None:
        if stats.needs:
            with stats.attach(run.adapter.linears(block)):
                forward(run, block, stream, stats=stats, keep=False)
        return None

    def recover(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor | None,
                targets: torch.Tensor | None, masks: BlockMasks,
                trains: bool) -> Generator[Event, None, tuple[torch.Tensor | None, float | None, float | None]]:
        if stream is not None:
            stream, _ = forward(run, block, stream)
        return stream, None, None
        yield  # a generator that emits nothing

    def after(self, run, label: str) -> Iterator[Event]:
        """Once every block is done: evaluate (a resumed run keeps a perplexity it already has)."""
        if label not in run.summary.ppl:
            yield from run.evaluate(label)
