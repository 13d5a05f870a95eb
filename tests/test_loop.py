"""The generic block loop (loop.block_loop) with a fake pruner, a fake recovery and a fake run: no model, no data,
blocks of two small linears, so the whole module runs in milliseconds.

What the loop promises, whatever the pruner and the recovery: one BlockStarted/BlockFinished pair per block in
order; the pruner asked once per block, with the sparsity its allocation gave that block; the recovery's
targets and recover called once per block; each block's inputs are the previous block's outputs (after it was
pruned); a cancel between blocks raises Cancelled; a variant resumed from a checkpoint skips its done blocks
and goes on exactly as the uninterrupted run did.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ebft_engine.errors import Cancelled
from ebft_engine.events import BlockFinished, BlockStarted, Notice
from ebft_engine.loop import BlockMasks, Variant, block_loop, forward
from ebft_engine.sparsity import StatsCollector, lowest_per_row

HIDDEN, N_BLOCKS, N_SEQ, SEQ, VOCAB = 8, 4, 6, 5, 16
SPARSITIES = [0.25, 0.5, 0.0, 0.75]  # per-row counts 2, 4, 0, 6 of 8: exact, so measured == allocated
LABEL = "fake"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o_proj(torch.tanh(self.q_proj(x)))


class Adapter:
    """What the loop reads of a model's family adapter."""

    input_groups = (("q_proj",), ("o_proj",))  # the projections by the input they read (statistics hooks)

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.num_blocks = N_BLOCKS

    def linears(self, block: Block) -> dict[str, nn.Linear]:
        return {"q_proj": block.q_proj, "o_proj": block.o_proj}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)


class Checkpoints:
    """Blocks saved by run.checkpoint, restored by load; ``done`` finished blocks to resume after."""

    def __init__(self, saved: dict[int, dict[str, torch.Tensor]] | None = None, done: int = 0):
        self.saved, self._done, self.started, self.loaded = saved if saved is not None else {}, done, [], []

    def done(self, label: str) -> int:
        return self._done

    def start(self, label: str) -> None:
        self.started.append(label)

    def load(self, label: str, index: int, block: nn.Module):
        self.loaded.append(index)
        block.load_state_dict(self.saved[index])
        return None  # masked, not shrunk: no structure


class Run:
    """A loop.BlockRun: the attributes and services block_loop, forward and restore_finished touch."""

    def __init__(self, checkpoints: Checkpoints | None = None, cancel_after: int | None = None):
        self.adapter = Adapter()
        self.model = self.adapter.blocks
        self.config = SimpleNamespace(calib=SimpleNamespace(nsamples=N_SEQ))
        self.precision = SimpleNamespace(device=torch.device("cpu"), storage=torch.float32,
                                         autocast=contextlib.nullcontext)
        self.plan = SimpleNamespace(activations="host")
        self.calib_ids = torch.randint(0, VOCAB, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(1))
        self.dense_numel = [{"q_proj": HIDDEN * HIDDEN, "o_proj": HIDDEN * HIDDEN} for _ in range(N_BLOCKS)]
        self.checkpoints = checkpoints or Checkpoints()
        self.stage = self.where = ""
        self.cancel_after, self.finished = cancel_after, []  # cancel once this many blocks are done
        self.log: list[tuple] = []
        self.tally = None

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.finished) >= self.cancel_after

    def call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x)

    def variant_started(self, label: str, start: int, sparsities: list[float]) -> None:
        self.log.append(("variant_started", label, start, list(sparsities)))

    def block_done(self, label: str, index: int, row, dead: dict[str, int]) -> None:
        self.log.append(("block_done", index, row is not None))

    def checkpoint(self, label: str, index: int, block: nn.Module, kept) -> None:
        self.finished.append(index)
        self.checkpoints.saved[index] = {k: v.clone() for k, v in block.state_dict().items()}

    def variant_done(self, label: str, tally):
        self.log.append(("variant_done", label))
        self.tally = tally
        yield Notice("info", "variant done")


class Pruner:
    """Removes the lowest |W| of every row of each linear at the sparsity it is given; remembers every call."""

    name, needs, structured = "fake", frozenset(), False

    def __init__(self):
        self.allocated, self.calls = [], []

    def allocate(self, run, label, start):
        self.allocated.append(start)
        yield Notice("info", "allocated")
        return list(SPARSITIES)

    def prune(self, run, block, index, stats, sparsity):
        assert isinstance(stats, StatsCollector) and stats.needs == self.needs
        self.calls.append((index, sparsity))
        out = BlockMasks()
        for linear in run.adapter.linears(block).values():
            mask = lowest_per_row(linear.weight.detach().abs(), sparsity)
            with torch.no_grad():
                linear.weight.mul_(mask)
            out.masks[linear.weight] = mask
        return out


class Recovery:
    """Trains nothing; records what the loop gives it and propagates the stream through the pruned block."""

    phase = "prune"

    def __init__(self, trains: bool = True):
        self.trains = trains
        self.begun, self.targeted, self.inputs, self.outputs, self.trained = [], [], {}, {}, {}

    def begin(self, run, stream, start):
        self.begun.append((None if stream is None else stream.clone(), start))

    def diverges(self, before):
        return False

    def targets(self, run, block, stream, stats):
        self.targeted.append(block)
        return None if stream is None else stream * 2  # something recover can recognise

    def recover(self, run, block, index, stream, targets, masks, trains):
        assert masks.masks, "recover was called before the block was pruned"
        if stream is not None:
            assert torch.equal(targets, stream * 2)
            self.inputs[index] = stream.clone()
        self.trained[index] = trains
        out = None if stream is None else forward(run, block, stream)[0]
        if out is not None:
            self.outputs[index] = out.clone()
        return out, (1.0 if trains else None), (0.5 if trains else None)
        yield


def _events(run, pruner, recovery):
    return list(block_loop(run, Variant(LABEL, pruner, recovery)))


def test_events_pruner_and_recovery_per_block_in_order():
    run, pruner, recovery = Run(), Pruner(), Recovery()
    events = _events(run, pruner, recovery)
    blocks = [(type(e).__name__, e.block) for e in events if isinstance(e, (BlockStarted, BlockFinished))]
    assert blocks == [(kind, i) for i in range(N_BLOCKS) for kind in ("BlockStarted", "BlockFinished")]
    assert [e.text for e in events if isinstance(e, Notice)] == ["allocated", "variant done"]
    assert all(e.label == LABEL and e.total == N_BLOCKS for e in events if isinstance(e, (BlockStarted, BlockFinished)))
    assert pruner.allocated == [0]
    assert pruner.calls == list(enumerate(SPARSITIES))  # once per block, with that block's allocated sparsity
    assert recovery.targeted == list(run.adapter.blocks)
    assert recovery.trained == {0: True, 1: True, 2: False, 3: True}  # nothing pruned, no divergence: no training
    finished = [e for e in events if isinstance(e, BlockFinished)]
    assert [e.sparsity for e in finished] == SPARSITIES  # measured on the block's weights
    assert all(set(e.layers.values()) == {s} for e, s in zip(finished, SPARSITIES))
    assert [(e.initial_loss, e.final_loss) for e in finished] == [(1.0, 0.5), (1.0, 0.5), (None, None), (1.0, 0.5)]
    assert run.log[0] == ("variant_started", LABEL, 0, SPARSITIES) and run.log[-1] == ("variant_done", LABEL)
    assert run.finished == list(range(N_BLOCKS)) and run.checkpoints.started == [LABEL]
    assert run.tally.sparsity == pytest.approx(sum(SPARSITIES) / N_BLOCKS)


def test_each_block_sees_the_previous_blocks_pruned_outputs():
    run, recovery = Run(), Recovery()
    _events(run, Pruner(), recovery)
    first = run.adapter.embed(run.calib_ids)
    assert torch.equal(recovery.begun[0][0], first) and recovery.begun[0][1] == 0
    assert torch.equal(recovery.inputs[0], first)
    for i in range(1, N_BLOCKS):
        assert torch.equal(recovery.inputs[i], recovery.outputs[i - 1]), f"block {i} did not get block {i - 1}'s outputs"
    x = first
    with torch.no_grad():
        for block in run.adapter.blocks:  # pruned in place by now
            x = block(x)
    assert torch.allclose(recovery.outputs[N_BLOCKS - 1], x)


def test_without_training_or_statistics_the_stream_is_never_built():
    run, recovery = Run(), Recovery(trains=False)
    events = _events(run, Pruner(), recovery)
    assert recovery.begun == [(None, 0)] and recovery.inputs == {} and recovery.outputs == {}
    assert recovery.trained == dict.fromkeys(range(N_BLOCKS), False)
    assert [e.sparsity for e in events if isinstance(e, BlockFinished)] == SPARSITIES


def test_a_cancel_between_blocks_raises_cancelled_and_goes_no_further():
    run, pruner = Run(cancel_after=2), Pruner()
    seen = []
    with pytest.raises(Cancelled):
        for event in block_loop(run, Variant(LABEL, pruner, Recovery())):
            seen.append(event)
    assert [e.block for e in seen if isinstance(e, BlockStarted)] == [0, 1]
    assert [e.block for e in seen if isinstance(e, BlockFinished)] == [0, 1]
    assert [i for i, _ in pruner.calls] == [0, 1] and run.finished == [0, 1]
    assert ("variant_done", LABEL) not in run.log


def test_resuming_skips_the_done_blocks_and_goes_on_as_before():
    whole, whole_recovery = Run(), Recovery()
    _events(whole, Pruner(), whole_recovery)
    done = 2
    saved = {i: whole.checkpoints.saved[i] for i in range(done)}  # killed after block 1's checkpoint
    resumed, pruner, recovery = Run(Checkpoints(saved, done=done)), Pruner(), Recovery()
    events = _events(resumed, pruner, recovery)
    assert isinstance(events[1], Notice) and events[1].text.startswith(f"resuming {LABEL}: blocks 0-1 restored")
    assert [e.block for e in events if isinstance(e, BlockStarted)] == [2, 3]
    assert pruner.allocated == [done] and [i for i, _ in pruner.calls] == [2, 3]
    assert resumed.checkpoints.loaded == [0, 1] and resumed.checkpoints.started == []
    assert resumed.log[0] == ("variant_started", LABEL, done, SPARSITIES)
    assert sorted(recovery.inputs) == [2, 3]
    # the restored blocks' outputs were recomputed: block 2 gets what it got in the uninterrupted run
    assert torch.allclose(recovery.inputs[2], whole_recovery.inputs[2])
    assert torch.allclose(recovery.outputs[3], whole_recovery.outputs[3])
    # the restored blocks are counted: the same measured sparsity and mask digest as the whole run
    assert resumed.tally.sparsity == pytest.approx(whole.tally.sparsity)
    assert resumed.tally.mask_sha256 == whole.tally.mask_sha256
