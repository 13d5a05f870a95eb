"""The block loop, which names no method: for each block it asks a pruner for the block's sparsity and masks and
a recovery for the targets and the training, then propagates the calibration stream to the next block.

    stream X₀ = embed(calibration tokens)                              (n, seq, hidden), on the host or device
    for each block i (alone on the device):
        targets = recovery.targets(block, Xᵢ)    the dense block's outputs (EBFT), the dense stream (EBFT-GP),
                                                 none (pruning only); the pruner's statistics are taken here
        masks   = pruner.prune(block, i, stats, sparsityᵢ)
        Xᵢ₊₁    = recovery.recover(block, Xᵢ, targets, masks)   trained or not, the block's outputs

A pruner (``pruners/``) allocates the per-block sparsities (uniform, OWL, structured's keep-first/last) and
makes one block's masks, or shrinks it; a recovery (``recoveries/``) says what the block is trained towards.
Both see the run through :class:`BlockRun`, the services this loop and they share.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Protocol

import torch
from torch import nn

from .checkpoint import mask_digest_update, new_digest
from .device import check_finite
from .errors import Cancelled
from .events import BlockFinished, BlockStarted, Event, Notice
from .evaluate import INFER_BATCH
from .sparsity import StatsCollector
from .summary import BlockRow


@dataclass
class BlockMasks:
    """What a pruner did to one block.

    Attributes:
        masks: parameter -> bool keep-mask (on the device), held fixed while the block trains; empty for a block
            that was shrunk (its matrices are smaller, nothing to hold).
        dead: layer short name -> bool positions the mask keeps in input columns that never fire (SparseGPT zeroes
            them): kept yet zero, they are counted apart in the summary.
        kept: structured pruning: the heads and channels the block kept (for the checkpoint and the digest).
    """

    masks: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)
    dead: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, list[int]] | None = None


class BlockRun(Protocol):
    """The services of a run that the loop, pruners and recoveries use (implemented by ``runner.Run``)."""

    config: Any
    precision: Any
    adapter: Any
    model: nn.Module
    calib_ids: torch.Tensor  # (n, seq) calibration token ids
    dense_numel: list[dict[str, int]]  # per block: layer short name -> its dense number of weights
    checkpoints: Any
    stage: str
    where: str

    def cancelled(self) -> bool: ...
    def call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor: ...
    def variant_started(self, label: str, start: int, sparsities: list[float]) -> None: ...
    def block_done(self, label: str, index: int, row: BlockRow | None, dead: dict[str, int]) -> None: ...
    def variant_done(self, label: str, tally: "VariantTally") -> Iterator[Event]: ...
    def checkpoint(self, label: str, index: int, block: nn.Module, kept: dict[str, list[int]] | None) -> None: ...


class Pruner(Protocol):
    name: str
    needs: frozenset[str]  # activation statistics prune() reads ("input_norms", "hessian", "moments")
    structured: bool  # removes whole heads and channels (matrices shrink) instead of masking weights

    def allocate(self, run: BlockRun, label: str, start: int) -> Generator[Event, None, list[float]]: ...
    def prune(self, run: BlockRun, block: nn.Module, index: int, stats: StatsCollector,
              sparsity: float) -> BlockMasks: ...


class BlockRecovery(Protocol):
    phase: str  # "ebft" (trains) or "prune"
    trains: bool

    def begin(self, run: BlockRun, stream: torch.Tensor | None, start: int) -> None: ...
    def targets(self, run: BlockRun, block: nn.Module, stream: torch.Tensor | None,
                stats: StatsCollector) -> torch.Tensor | None: ...
    def recover(self, run: BlockRun, block: nn.Module, index: int, stream: torch.Tensor | None,
                targets: torch.Tensor | None, masks: BlockMasks,
                trains: bool) -> Generator[Event, None, tuple[torch.Tensor | None, float | None, float | None]]: ...


@dataclass
class Variant:
    """One pruned model of a run: its label, the pruner that makes its masks and the recovery that trains it."""

    label: str
    pruner: Pruner
    recovery: Any  # a BlockRecovery that may also recover the whole model afterwards (recoveries/)


def block_loop(run: BlockRun, variant: Variant) -> Iterator[Event]:
    """Prune (and recover) every block of ``variant`` in order, resuming after its checkpointed blocks."""
    label, pruner, recovery = variant.label, variant.pruner, variant.recovery
    n_blocks, start = run.adapter.num_blocks, run.checkpoints.done(label)
    sparsities = yield from pruner.allocate(run, label, start)
    run.variant_started(label, start, sparsities)
    stream = embed_calibration(run) if recovery.trains or pruner.needs else None  # (n, seq, hidden)
    recovery.begin(run, stream, start)
    tally = VariantTally(run.dense_numel)
    stream = yield from restore_finished(run, label, start, stream, tally)
    for i, block in enumerate(run.adapter.blocks):
        if i < start:
            continue
        check_cancelled(run)
        t_block = time.perf_counter()
        run.stage, run.where = "block", f"block {i} of {label}"
        yield BlockStarted(label, i, n_blocks)
        block.to(run.precision.device)
        stats = StatsCollector(pruner.needs, run.adapter.input_groups)
        targets = recovery.targets(run, block, stream, stats)
        masks = pruner.prune(run, block, i, stats, sparsities[i])
        del stats  # the Hessians and norms are spent: free them before the block trains (as planned)
        # A block with nothing pruned computes its own target (the dense block on the same inputs) unless the
        # target is the dense model's stream and a pruned block came before it.
        trains = recovery.trains and (sparsities[i] > 0 or recovery.diverges(sparsities[:i]))
        stream, initial, final = yield from recovery.recover(run, block, i, stream, targets, masks, trains)
        zeros, total, layers, dead = tally.add(run.adapter.linears(block), i, masks)
        run.block_done(label, i, None, dead)  # dead-channel counts go to the summary before the checkpoint
        block.to("cpu")
        run.checkpoint(label, i, block, masks.kept)
        done = BlockFinished(label=label, block=i, total=n_blocks, initial_loss=initial, final_loss=final,
                             seconds=time.perf_counter() - t_block, sparsity=zeros / total, layers=layers)
        if trains:  # the block's row survives a crash
            run.block_done(label, i, BlockRow(label, i, initial, final, done.seconds, done.sparsity), {})
        yield done
    yield from run.variant_done(label, tally)


class VariantTally:
    """A variant's measured sparsity and mask digest, accumulated block by block in order."""

    def __init__(self, dense_numel: list[dict[str, int]]):
        self.dense_numel, self.zeros, self.total, self.digest = dense_numel, 0, 0, new_digest()

    def add(self, linears: dict[str, nn.Linear], index: int,
            masks: BlockMasks) -> tuple[int, int, dict[str, float], dict[str, int]]:
        """Count one finished block: (zeros, dense weights, per-layer sparsity, dead-channel weights per layer)."""
        dense = self.dense_numel[index]
        kept = {name: int(torch.count_nonzero(layer.weight)) for name, layer in linears.items()}
        total = sum(dense[name.rsplit(".", 1)[-1]] for name in kept)
        zeros = total - sum(kept.values())
        mask_digest_update(self.digest, linears, masks.kept)
        self.zeros, self.total = self.zeros + zeros, self.total + total
        layers = {name: 1 - n / dense[name.rsplit(".", 1)[-1]] for name, n in kept.items()}
        dead = {name: int((positions & (linears[name].weight == 0)).sum()) for name, positions in masks.dead.items()}
        return zeros, total, layers, {name: n for name, n in dead.items() if n}

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total

    @property
    def mask_sha256(self) -> str:
        return self.digest.hexdigest()[:16]


def restore_finished(run: BlockRun, label: str, start: int, stream: torch.Tensor | None,
                   tally: VariantTally) -> Generator[Event, None, torch.Tensor | None]:
    """Put back the first ``start`` blocks of a resumed variant, count them and recompute their outputs."""
    if start == 0:
        run.checkpoints.start(label)
        return stream
    redo = stream is not None and start < run.adapter.num_blocks
    yield Notice("info", f"resuming {label}: blocks 0-{start - 1} restored from the checkpoint" +
                 ("; recomputing their outputs on the calibration set" if redo else ""))
    for i, block in enumerate(list(run.adapter.blocks)[:start]):
        check_cancelled(run)
        kept = run.checkpoints.load(label, i, block)
        tally.add(run.adapter.linears(block), i, BlockMasks(kept=kept))
        if redo:
            run.stage, run.where = "block", f"block {i} of {label} (restored)"
            block.to(run.precision.device)
            stream, _ = forward(run, block, stream)
            block.to("cpu")
    return stream


def embed_calibration(run: BlockRun) -> torch.Tensor:
    """Block 0's inputs for the calibration tokens, (n, seq, hidden) in the storage dtype: on a GPU on the device
    when the memory planner found room for the EBFT phase with them there, else in pinned host memory."""
    p = run.precision
    with torch.no_grad():
        stream = run.adapter.embed(run.calib_ids).to(p.storage)
    if p.device.type == "cuda":
        stream = stream.to(p.device) if run.plan.activations == "device" else stream.pin_memory()
    return stream


def check_cancelled(run: BlockRun) -> None:
    if run.cancelled():
        raise Cancelled()


@torch.no_grad()
def forward(run: BlockRun, block: nn.Module, stream: torch.Tensor, stats: StatsCollector | None = None,
            targets: torch.Tensor | None = None, keep: bool = True) -> tuple[torch.Tensor | None, float | None]:
    """Run ``block`` over every calibration input; return (its outputs if ``keep``, MSE against ``targets``).

    Args:
        stream: (n, seq, hidden) the block's inputs; outputs come back in its dtype and on its device.
        stats: collects the pruner's statistics, from the source's calibration sequences only, never from the
            self-generated ones appended after them (calib.self_nsamples): batches do not straddle the boundary.
    """
    p = run.precision
    out = torch.empty_like(stream) if keep else None
    sq, count = 0.0, 0
    primary = min(run.config.calib.nsamples, stream.shape[0])
    spans = [(a, min(a + INFER_BATCH, b)) for a0, b in ((0, primary), (primary, stream.shape[0]))
             for a in range(a0, b, INFER_BATCH)]
    for start, end in spans:
        check_cancelled(run)
        if stats is not None:
            stats.enabled = start < primary
        with p.autocast():
            y = run.call(block, stream[start:end].to(p.device))
        # the output as it is stored and propagated: float16 storage turns activations past 65504 into inf
        y = y.to(stream.dtype)
        check_finite(y, p, f"the calibration output of {run.where}")
        if stats is not None and start < primary:
            stats.count(end - start)
        if targets is not None:
            t = targets[start:end].to(p.device)
            sq += torch.sum((y.float() - t.float()) ** 2).item()
            count += t.numel()
        if keep:
            out[start:end] = y.to(out.dtype).to(out.device)
    if stats is not None:
        stats.enabled = True
    return out, (sq / count if count else None)


def stream_map(run: BlockRun, blocks: list[nn.Module], stream: torch.Tensor,
               each: Callable[[int, nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Carry ``stream`` through ``blocks`` one at a time on the device: ``each(i, block, stream)`` -> next."""
    for i, block in enumerate(blocks):
        check_cancelled(run)
        block.to(run.precision.device)
        stream = each(i, block, stream)
        block.to("cpu")
    return stream
