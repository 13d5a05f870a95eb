"""Recoveries: what a pruned block (or the whole pruned model) is trained towards.

- :class:`PruneOnly`: no training; the pruned baseline itself.
- :class:`Ebft` (``ebft``, the paper's): each block is trained, masks fixed, to reproduce the dense block's
  output on the same (sparse-model) inputs (docs/methods/ebft.md#the-target).
- :class:`EbftGlobal` (``ebft-gp``): the target is the dense model's own stream, the dense block on the dense
  inputs (global propagation, docs/methods/ebft.md#global-propagation-ebft-gp), so a block also learns to
  correct the error its predecessors left.
- :class:`Lora` (``lora``): a model recovery: the blocks are pruned as for a baseline, then LoRA adapters are
  trained on the calibration tokens; it reports two models, ``lora`` (adapters beside the sparse weights) and
  ``lora-merged`` (merged and re-masked) (docs/methods/lora.md).

``make_recovery(name)`` builds one; ``RECOVERIES`` lists the names in ``config.py``.
"""
from __future__ import annotations

from typing import Generator, Iterator

import torch
from torch import nn

from .events import Event, Notice
from .finetune import finetune_block
from .finetune.lora import lora_adapters, merge_and_remask, train_lora
from .loop import BlockMasks, BlockRun, forward, stream_map
from .sparsity import StatsCollector
from .summary import LoraInfo


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
            yield Notice("warning", f"block {index}: EBFT raised the reconstruction loss ({initial:.4g} -> "
                                    f"{final:.4g}); kept the pruned weights. A lower learning rate may help")
            outputs, final = forward(run, block, stream, targets=targets)
        return outputs, initial, (final if trains else None)

    def _train(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor, targets: torch.Tensor,
               masks: BlockMasks):
        run.stage = "train"
        block.float()
        result = yield from finetune_block(block, run.call, stream, targets, masks.masks, run.config.ebft,
                                           run.precision, label=self.name, index=index,
                                           seed=run.config.seed * 100_003 + index, cancelled=run.cancelled)
        block.to(run.precision.storage)
        run.stage = "block"
        if result.rolled_back:
            yield Notice("warning", f"block {index}: the reconstruction loss became non-finite; the block was "
                                    "restored to its pruned weights and the run goes on")
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


class Lora(PruneOnly):
    """LoRA from the pruned model (Hu et al. 2022): adapters on the calibration tokens, evaluated beside the
    sparse weights (``lora``), then merged and re-masked (``lora-merged``)."""

    name = "lora"

    def active(self, cfg) -> bool:
        return True

    def labels(self, label: str) -> tuple[str, ...]:
        return ("lora", "lora-merged")

    def after(self, run, label: str) -> Iterator[Event]:
        cfg, structured = run.config.lora, run.config.prune.structured
        budget = run.summary.seconds.get("ebft:ebft") if cfg.budget == "ebft" else None
        if cfg.budget == "ebft" and budget is None:
            yield Notice("warning", "lora.budget is ebft but EBFT did not run first in this run: LoRA trains for "
                                    f"{cfg.epochs} epochs instead")
        run.stage, run.where = "lora", "the LoRA training"
        with lora_adapters(run.model, cfg, structured=structured) as peft_model:
            result = yield from run.phase("lora", "lora", _train_lora(run, peft_model, budget))
            run.summary.lora = LoraInfo(
                steps=result.steps, epochs=round(result.epochs, 2), seconds=round(result.seconds, 1),
                adapter_params=result.adapter_params, targets=cfg.target_modules(structured), rank=cfg.rank,
                alpha=cfg.alpha, budget="ebft's time" if budget else f"{cfg.epochs} epochs",
                first_loss=result.first_loss, last_loss=result.last_loss)
            if "lora" not in run.summary.ppl:
                yield from run.evaluate("lora")
            merge_and_remask(peft_model, remask=not structured)
        run.measure("lora-merged")
        if "lora-merged" not in run.summary.ppl:
            yield from run.evaluate("lora-merged")


def _train_lora(run, peft_model: nn.Module, budget: float | None):
    cfg = run.config.lora
    result = yield from train_lora(peft_model, run.calib_ids, cfg, run.precision, seed=run.config.seed,
                                   budget_seconds=budget, cancelled=run.cancelled)
    yield Notice("info", f"LoRA: {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.0f} s, "
                         f"{result.adapter_params:,} adapter parameters, loss {result.first_loss:.3f} -> "
                         f"{result.last_loss:.3f}" if result.steps else "LoRA: no training step fitted in the budget")
    return result


RECOVERY_CLASSES = {"ebft": Ebft, "ebft-gp": EbftGlobal, "lora": Lora}


def make_recovery(name: str | None) -> PruneOnly:
    """The recovery for a name in ``config.RECOVERIES``; None for a pruned baseline."""
    return PruneOnly() if name is None else RECOVERY_CLASSES[name]()
