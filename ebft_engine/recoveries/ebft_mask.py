"""Learned masks (``ebft-mask``, ``ebft-mask-gp``; docs/methods/ebft-mask.md): EBFT that also chooses which
weights to keep. Each block trains towards the same target as ``ebft`` (or ``ebft-gp``), starting from the pruner's
mask as a prior; the mask follows the trained weights' saliency under the pruner's exact pattern (N:M, or the same
count per row or per layer) and freezes before the block ends (finetune/masks.py)."""
from __future__ import annotations

from typing import Generator

import torch
from torch import nn

from ..events import Event, Notice
from ..finetune.masks import MaskLearner
from ..loop import BlockMasks, BlockRun
from ..registry import RecoveryEntry, add_recovery
from ..sparsity import StatsCollector
from .ebft import Ebft, EbftGlobal


class EbftMask(Ebft):
    """EBFT whose masks are learned with the weights, the dense block's outputs on the sparse inputs as target."""

    name, learns_masks = "ebft-mask", True

    def targets(self, run: BlockRun, block: nn.Module, stream: torch.Tensor | None,
                stats: StatsCollector) -> torch.Tensor | None:
        """The target of the parent recovery; the same pass also measures the input column norms the mask's
        saliency reads (from the dense block, on the calibration sequences the pruner's statistics use)."""
        stats.needs = stats.needs | {"input_norms"}
        # the weights before pruning: where a pruned weight starts from if it is learned back (float32 on the
        # device, one copy of the block's projections, freed when the block is done)
        self.dense_weights = {name: linear.weight.detach().to(torch.float32, copy=True)
                              for name, linear in run.adapter.linears(block).items()}
        targets = super().targets(run, block, stream, stats)
        self.saliency = {name: stats.sq_norms[group[0]].sqrt() for group in run.adapter.input_groups
                         for name in group if group[0] in stats.sq_norms}
        return targets

    def _train(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor, targets: torch.Tensor,
               masks: BlockMasks):
        learner = MaskLearner.for_block(run.adapter.linears(block), masks.masks, self.saliency, run.config.prune.nm,
                                        dense=self.dense_weights)
        self.dense_weights = None
        result = yield from self._finetune(run, block, index, stream, targets, learner.grad_masks,
                                           learner.after_step)
        rolled_back = result.rolled_back
        learned = learner.finish(rolled_back)
        if rolled_back:  # the trainer restored the pruned weights; its late masks must not touch them
            result.restore_pruned(block)
        self._prior = (dict(masks.masks), dict(masks.dead))  # for restored()
        self._adopt(masks, learned, run.adapter.linears(block))
        self.changed = 0.0 if rolled_back else learner.mask_change()
        if rolled_back:
            yield Notice("warning", f"block {index}: the reconstruction loss became non-finite; the block was "
                                    "restored to its pruned weights and masks, and the run goes on")
        return result

    def recover(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor | None,
                targets: torch.Tensor | None, masks: BlockMasks,
                trains: bool) -> Generator[Event, None, tuple[torch.Tensor | None, float | None, float | None]]:
        """EBFT's recover; then how much of the block's mask the training changed, as the block ends."""
        self.changed = None
        outcome = yield from super().recover(run, block, index, stream, targets, masks, trains)
        if self.changed is not None:
            yield Notice("info", f"block {index}: {self.name} changed {self.changed:.2%} of the mask (weights that "
                                 "entered or left, of all masked weights)")
        return outcome

    def restored(self, masks: BlockMasks) -> None:
        """Training raised the block's loss and its pruned weights are back: so are the pruner's masks."""
        prior, dead = self._prior
        masks.masks.update(prior)
        masks.dead.update(dead)
        self.changed = 0.0

    @staticmethod
    def _adopt(masks: BlockMasks, learned: dict[nn.Parameter, torch.Tensor], linears: dict[str, nn.Linear]) -> None:
        """The learned masks become the block's; a position in a dead input column counts as kept-yet-zero
        only while the learned mask still keeps it."""
        masks.masks.update(learned)
        for name, positions in masks.dead.items():
            mask = learned.get(linears[name].weight)
            if mask is not None:
                masks.dead[name] = positions & mask


class EbftMaskGlobal(EbftMask, EbftGlobal):
    """Learned masks with global propagation: the dense model's own stream is the target."""

    name = "ebft-mask-gp"


add_recovery(RecoveryEntry("ebft-mask", "EBFT that also learns which weights to keep (prune and regrow inside the "
                                        "pruner's pattern, from its mask)", EbftMask, rank=3))
add_recovery(RecoveryEntry("ebft-mask-gp", "learned masks with global propagation (the dense model's stream as "
                                           "the target)", EbftMaskGlobal, rank=4))
