"""EBFT (Guo et al. 2024, docs/methods/ebft.md#the-target): each block trained, masks fixed, to reproduce the dense
block's output on the same (sparse-model) inputs; and ``ebft-gp``, whose target is the dense model's own stream
(global propagation, docs/methods/ebft.md#global-propagation-ebft-gp), so a block also learns to correct the
error its predecessors left."""
from __future__ import annotations

from typing import Generator

import torch
from torch import nn

from ..events import Event, Notice
from ..finetune import finetune_block
from ..loop import BlockMasks, BlockRun, forward, stream_map
from ..registry import RecoveryEntry, add_recovery
from ..sparsity import StatsCollector
from .base import PruneOnly


class Ebft(PruneOnly):
    """EBFT: the dense block's output on the sparse model's inputs is the target (Guo et al. 2024)."""

    phase, trains, name = "ebft", True, "ebft"

    def active(self, cfg) -> bool:
        return cfg.ebft.epochs > 0

    def labels(self, label: str) -> tuple[str, ...]:
        return (self.name,)

    def targets(self, run: BlockRun, block: nn.Module, stream: torch.Tensor | None,
                stats: StatsCollector) -> torch.Tensor | None:
        with stats.attach(run.adapter.linears(block)):
            targets, _ = forward(run, block, stream, stats=stats, keep=True)
        return targets

    def recover(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor | None,
                targets: torch.Tensor | None, masks: BlockMasks,
                trains: bool) -> Generator[Event, None, tuple[torch.Tensor | None, float | None, float | None]]:
        """Train the block towards ``targets`` (when ``trains``), then propagate; keep the pruned weights if
        training raised the loss on its own data (too high a learning rate for this block), and say so."""
        initial = result = None
        if trains:
            result = yield from self._train(run, block, index, stream, targets, masks)
            initial = result.initial_loss
        outputs, final = forward(run, block, stream, targets=targets)
        if trains and final > initial:
            result.restore_pruned(block)
            self.restored(masks)
            yield Notice("warning", f"block {index}: EBFT raised the reconstruction loss ({initial:.4g} -> "
                                    f"{final:.4g}); kept the pruned weights. A lower learning rate may help")
            outputs, final = forward(run, block, stream, targets=targets)
        return outputs, initial, (final if trains else None)

    def restored(self, masks: BlockMasks) -> None:
        """The block went back to its pruned weights (training raised its loss): ``masks`` must say so."""

    def _train(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor, targets: torch.Tensor,
               masks: BlockMasks):
        result = yield from self._finetune(run, block, index, stream, targets, masks.masks)
        if result.rolled_back:
            yield Notice("warning", f"block {index}: the reconstruction loss became non-finite; the block was "
                                    "restored to its pruned weights and the run goes on")
        return result

    def _finetune(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor, targets: torch.Tensor,
                  trainer_masks: dict, after_step=None):
        """``finetune_block`` on the block in float32 (back to its storage dtype after), seeded per block."""
        run.stage = "train"
        block.float()
        result = yield from finetune_block(block, run.call, stream, targets, trainer_masks, run.config.ebft,
                                           run.precision, label=self.name, index=index,
                                           seed=run.config.seed * 100_003 + index, cancelled=run.cancelled,
                                           after_step=after_step)
        block.to(run.precision.storage)
        run.stage = "block"
        return result


class EbftGlobal(Ebft):
    """EBFT with global propagation: the dense model's own stream is the target, so blocks after a pruned one
    train even when nothing of their own was pruned."""

    name = "ebft-gp"

    def begin(self, run: BlockRun, stream: torch.Tensor | None, start: int) -> None:
        """The dense stream up to the first block still to do (the blocks are still dense here: a resumed
        variant's finished blocks are restored after this)."""
        def step(i: int, block: nn.Module, dense: torch.Tensor) -> torch.Tensor:
            run.stage, run.where = "block", f"block {i} of the dense stream"
            return forward(run, block, dense)[0]

        self.dense = stream_map(run, list(run.adapter.blocks)[:start], stream.clone(), step)

    def diverges(self, before: list[float]) -> bool:
        return any(s > 0 for s in before)

    def targets(self, run: BlockRun, block: nn.Module, stream: torch.Tensor | None,
                stats: StatsCollector) -> torch.Tensor | None:
        PruneOnly.targets(self, run, block, stream, stats)  # the masks still come from the sparse model's inputs
        self.dense, _ = forward(run, block, self.dense)  # the dense output is the next block's dense input
        return self.dense


add_recovery(RecoveryEntry("ebft", "EBFT: each block trained towards the dense block on the sparse inputs (the "
                                   "paper's target)", Ebft, rank=0))
add_recovery(RecoveryEntry("ebft-gp", "EBFT with global propagation: the dense model's own stream as the target",
                           EbftGlobal, rank=1))
