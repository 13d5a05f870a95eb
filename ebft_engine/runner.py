"""One run's state and its order of work: load, data, dense evaluation, then every variant (a pruner and a
recovery, ``loop.Variant``) through the block loop and its evaluations, then the export. ``execute`` yields the
run's events; ``pipeline._drive`` records them and ends the run whatever happens."""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import numpy as np
import torch
from torch import nn

from . import phases, registry
from .checkpoint import Checkpoints
from .config import RunConfig
from .errors import EbftError
from .events import Event, Notice, PhaseFinished, PhaseStarted
from .loop import BlockMasks, Variant, VariantTally, block_loop
from .models import FileBackedBlocks, restore_blocks
from .planner import GiB
from .pruners import make_pruner
from .record import RunRecord, load_summary_file, write_json_atomic
from .summary import BlockRow, DeadChannels, RunSummary
from .recoveries import make_recovery
from .remedies import oom_remedy
from .sparsity import structured as st

log = logging.getLogger(__name__)


class Run:
    """State of one run (numbers carried over from ``previous``, the summary of a resumed run)."""

    def __init__(self, config: RunConfig, record: RunRecord, cancelled: Callable[[], bool],
                 previous: dict[str, Any] | None = None):
        self.config, self.record, self.cancelled = config, record, cancelled
        self.checkpoints = Checkpoints(record.dir)
        self.started = time.perf_counter()
        # everything measured (a resumed run's numbers carried over from ``previous``): summary.json's content
        self.summary = RunSummary.start(record.dir.name, config.to_dict(), previous)
        self.precision = self.model_config = self.plan = self.adapter = self.dense = self._kwargs = None
        # what the run is doing, for a message if memory runs out: the stage picks the remedy (remedies.oom_remedy)
        self.stage, self.where = "start", "starting"
        self.finished_summary: dict[str, Any] | None = None
        self.json_out_note: str | None = None  # why --json-out was not written, for the last notice
        record.write_config(config.to_dict())
        self.write_summary()  # a crash leaves this: the folder says it never finished

    def emit(self, event: Event) -> Event:
        """Record ``event`` in the run folder and pass it on."""
        self.record.append(event)
        return event

    # ---- the order of work ------------------------------------------------------------------------------
    def execute(self) -> Iterator[Event]:
        cfg = self.config
        _seed_everything(cfg.seed)
        yield from self.phase("load", "", phases.load(self), announce=cfg.model)
        yield from self.phase("data", "", phases.prepare_data(self))
        if "dense" not in self.summary.ppl:  # a resumed run keeps every number it had already measured
            yield from self.evaluate("dense")
        variants = self.variants()
        # Variants still to do; the last one again when the model is to be saved, restored from its checkpoint.
        todo = [v for k, v in enumerate(variants)
                if not self.done(v) or (cfg.save_model and k == len(variants) - 1)]
        if self.dense is None and len(todo) > 1:
            yield from self._keep_dense()
        for k, variant in enumerate(todo):
            if k > 0:
                restore_blocks(self.model, self.dense)
            yield from self.phase(variant.recovery.phase, variant.label, block_loop(self, variant))
            yield from variant.recovery.after(self, variant.label)
        self.dense = None
        if cfg.save_model:
            yield from self.phase("save", "", phases.save(self))

    def variants(self) -> list[Variant]:
        """The pruned baselines, then each recovery from --method's masks (or --method pruned alone)."""
        cfg = self.config
        out = [Variant(b, make_pruner(b, cfg.prune), make_recovery(None)) for b in cfg.baselines]
        recoveries = registry.active_recoveries(cfg)
        out += [Variant(r.name, make_pruner(cfg.prune.method, cfg.prune), r) for r in recoveries]
        if not recoveries and cfg.prune.method not in cfg.baselines:
            out.append(Variant(cfg.prune.method, make_pruner(cfg.prune.method, cfg.prune), make_recovery(None)))
        return out

    def done(self, variant: Variant) -> bool:
        return all(label in self.summary.ppl for label in variant.recovery.labels(variant.label))

    def _keep_dense(self) -> Iterator[Event]:
        """The dense blocks to restore between variants: from the model's files, else a copy in host memory."""
        self.dense = FileBackedBlocks.find(self.source, self.model)
        if self.dense is None:
            self.dense = [p.detach().clone() for p in self.adapter.blocks.parameters()]
            gib = sum(t.numel() * t.element_size() for t in self.dense) / GiB
            yield Notice("warning", f"the model has no local safetensors files to restore its dense blocks from "
                                    f"between variants: keeping a {gib:.1f} GiB copy in host memory instead")

    def phase(self, name: str, label: str, work: Generator, announce: str | None = None) -> Generator:
        """Announce, run and time one phase (seconds summed per ``phase:label`` in the summary)."""
        yield PhaseStarted(name, label if announce is None else announce)
        started = time.perf_counter()
        result = yield from work
        seconds = time.perf_counter() - started
        self.summary.add_seconds(f"{name}:{label}" if label else name, seconds)
        yield PhaseFinished(name, label, seconds)
        return result

    def evaluate(self, label: str) -> Iterator[Event]:
        yield from self.phase("eval", label, phases.evaluate(self, label))
        if self.config.eval.zeroshot and label not in self.summary.zeroshot:
            yield from self.phase("zeroshot", label, phases.zero_shot(self, label))

    # ---- services of the block loop (loop.BlockRun) -----------------------------------------------------
    def call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block on (batch, seq, hidden) inputs, with the arguments the model's own forward gives it."""
        if self._kwargs is None:
            p = self.precision
            self._kwargs = self.adapter.block_kwargs(self.config.calib.seqlen, p.device, p.storage)
        return self.adapter.call_block(block, x, self._kwargs)

    def variant_started(self, label: str, start: int, sparsities: list[float]) -> None:
        self.summary.sparsity_profile[label] = [round(s, 6) for s in sparsities]
        # the rows and dead-channel counts of the blocks being restored stay; the blocks still to do add theirs
        self.summary.restart_blocks(label, start)
        self.summary.restart_dead_channels(label, start)

    def block_done(self, label: str, index: int, row: BlockRow | None, dead: dict[str, int]) -> None:
        recorded = self.summary.add_dead_channels(label, index, dead)
        if row is not None:
            self.summary.blocks.append(row)
        if recorded or row is not None:
            self.write_summary()

    def checkpoint(self, label: str, index: int, block: nn.Module, kept: dict[str, list[int]] | None) -> None:
        try:
            self.checkpoints.save(label, index, block, structure=kept)
        except OSError as e:
            raise EbftError(f"could not write the checkpoint of block {index} under {self.checkpoints.dir} "
                            f"({e.strerror or e}); free some disk space, then continue the run with "
                            f"python -m ebft_engine run --resume {self.record.dir}") from None

    def variant_done(self, label: str, tally: VariantTally) -> Iterator[Event]:
        summary = self.summary
        summary.actual_sparsity[label], summary.mask_sha256[label] = tally.sparsity, tally.mask_sha256
        dead = summary.dead_channel_weights.get(label, DeadChannels())
        if dead.weights:
            yield Notice("warning", f"{label}: {dead.weights:,} weights in {dead.layers} layers were zeroed because "
                                    "their input channel never fires (dead channels, as the reference SparseGPT "
                                    f"does); measured sparsity {tally.sparsity:.1%} vs "
                                    f"{self.config.prune.sparsity:.1%} asked")
        summary.params[label] = sum(t.numel() for t in self.model.parameters())
        if self.config.prune.structured:
            summary.structure[label] = [st.counts(b) for b in self.adapter.blocks]

    def measure(self, label: str) -> None:
        """The measured sparsity and size of the model as it is now (a model recovery's merged result)."""
        tally = VariantTally(self.dense_numel)
        for i, block in enumerate(self.adapter.blocks):
            tally.add(self.adapter.linears(block), i, BlockMasks())
        self.summary.actual_sparsity[label] = tally.sparsity
        self.summary.params[label] = sum(t.numel() for t in self.model.parameters())

    # ---- failure, summary -------------------------------------------------------------------------------
    def out_of_memory(self) -> str:
        """The message for a device out-of-memory: where, what to change for the stage that ran out (only EBFT
        training reacts to --batch-size), and how to go on: resume where the change is allowed on resume."""
        fix, resumable_fix = oom_remedy(self.stage, self.model_config, self.config, self.precision,
                                        None if self.plan is None else self.plan.device_capacity)
        then = (f"then continue with python -m ebft_engine run --resume {self.record.dir} and that flag"
                if resumable_fix else
                "then start a new run with it (the finished numbers stay in this run's summary)")
        return f"out of device memory in {self.where}; {fix}, {then}"

    def release(self) -> None:
        """After a failure: every block back on the host in the storage dtype, no gradients, the cache freed,
        so the process is ready for the next run."""
        adapter, p = self.adapter, self.precision
        if adapter is not None and p is not None:
            for block in adapter.blocks:
                block.to("cpu", p.storage)
                for param in block.parameters():
                    param.grad = None
                    param.requires_grad_(False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def write_summary(self) -> None:
        self.record.write_summary(self.summary.snapshot("running", time.perf_counter() - self.started))

    def finish(self, status: str) -> dict[str, Any]:
        """The summary (written to summary.json and --json-out); safe to call at any point of the run."""
        if self.finished_summary is not None:
            return self.finished_summary
        summary = self.summary.snapshot(status, time.perf_counter() - self.started)
        self.record.write_summary(summary)
        if status == "finished":
            self.checkpoints.clear()  # nothing left to resume: give the disk back
        if self.config.json_out:
            self.json_out_note = self._write_json_out(Path(self.config.json_out), summary)
        self.finished_summary = summary
        return summary


    @staticmethod
    def _write_json_out(path: Path, summary: dict[str, Any]) -> str | None:
        """Copy the summary to ``--json-out``, unless this run did not finish and the file holds another run's
        finished summary: that result is kept (the run's own is in its folder). Returns what to tell the user."""
        if summary["status"] != "finished":
            previous = load_summary_file(path)
            if previous is not None and previous.status == "finished" and previous.run_id != summary["run_id"]:
                return (f"--json-out {path} holds run {previous.run_id}'s finished summary: kept it; this run's "
                        f"({summary['status']}) is in its run folder's summary.json")
        try:
            write_json_atomic(path, summary)
        except OSError as e:
            log.error("could not write --json-out %s: %s", path, e)
            return f"could not write --json-out {path} ({e.strerror or e}); the summary is in the run folder"
        return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
