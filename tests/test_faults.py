"""Faults injected on purpose: out of device memory, a non-finite loss, a full disk before and during a run,
a plan that cannot fit. Each ends in a clear message, keeps the run resumable, and leaves the process ready."""
from __future__ import annotations

import errno

import pytest
import torch

from ebft_engine import resume, run
from ebft_engine import phases
from ebft_engine.recoveries import ebft as recoveries
from ebft_engine.pruners import mask as pruners


def _notices(events, level):
    return [e.text for e in events if e.kind == "notice" and e.level == level]


def _fail_at_block(monkeypatch, block, error):
    real = recoveries.finetune_block

    def failing(*args, **kwargs):
        if kwargs["index"] == block:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(recoveries, "finetune_block", failing)


def test_out_of_memory_says_what_to_change_and_resumes_with_it(tiny_run_config, monkeypatch):
    _fail_at_block(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    events = list(run(tiny_run_config))
    assert events[-1].status == "failed"
    (error,) = _notices(events, "error")
    assert "out of device memory in block 1 of ebft" in error
    assert "--batch-size" in error and "--resume" in error and "Traceback" not in error
    monkeypatch.undo()
    again = list(resume(events[0].run_dir, overrides={"ebft.batch_size": 2}))
    assert again[-1].status == "finished", _notices(again, "error")
    assert any("resumed with ebft.batch_size=2" in t for t in _notices(again, "warning"))
    assert [b["index"] for b in again[-1].summary["blocks"]] == [0, 1]


def test_resume_refuses_changes_that_would_change_finished_blocks(tiny_run_config, monkeypatch):
    from ebft_engine import ConfigError

    _fail_at_block(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory"))
    events = list(run(tiny_run_config))
    with pytest.raises(ConfigError, match="prune.sparsity: cannot change when resuming"):
        next(resume(events[0].run_dir, overrides={"prune.sparsity": 0.7}))


def test_failure_leaves_every_block_on_the_host_without_gradients(tiny_run_config, monkeypatch):
    from ebft_engine.models import _CACHE

    _fail_at_block(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory"))
    list(run(tiny_run_config))
    (model, _tok, _dense), = _CACHE.values()
    for p in model.model.layers.parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad and p.grad is None


def test_an_injected_non_finite_loss_rolls_the_block_back_and_the_run_goes_on(tiny_run_config, monkeypatch):
    real = recoveries.finetune_block

    def poisoned(block, call, inputs, targets, masks, *args, **kwargs):
        if kwargs["index"] == 1:
            targets = targets.clone()
            targets[0, 0, 0] = float("inf")
        return real(block, call, inputs, targets, masks, *args, **kwargs)

    monkeypatch.setattr(recoveries, "finetune_block", poisoned)
    events = list(run(tiny_run_config))
    assert events[-1].status == "finished"
    warnings = _notices(events, "warning")
    assert any("block 1: the reconstruction loss became non-finite" in w for w in warnings)
    summary = events[-1].summary
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["ppl"].values())
    assert summary["actual_sparsity"]["ebft"] == pytest.approx(0.5)


def test_a_runs_folder_without_room_for_checkpoints_is_refused_before_loading(tiny_run_config, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    events = list(run(tiny_run_config))
    assert events[-1].status == "failed"
    (error,) = _notices(events, "error")
    assert error.startswith("runs_dir:") and "GiB free" in error and "--runs-dir" in error
    assert not any(e.kind == "notice" and e.text.startswith("loaded") for e in events)  # no weights were read


def test_a_disk_that_fills_up_mid_run_fails_cleanly_and_resumes(tiny_run_config, monkeypatch):
    from ebft_engine.checkpoint import Checkpoints

    real = Checkpoints.save

    def full(self, label, index, block, **kwargs):
        if label == "ebft" and index == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, label, index, block, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", full)
    events = list(run(tiny_run_config))
    assert events[-1].status == "failed"
    (error,) = _notices(events, "error")
    assert "No space left on device" in error and "--resume" in error
    assert "dense" in events[-1].summary["ppl"]  # finished numbers kept
    monkeypatch.undo()
    again = list(resume(events[0].run_dir))
    assert again[-1].status == "finished" and "ebft" in again[-1].summary["ppl"]


def test_a_plan_that_cannot_fit_is_refused_with_a_suggestion(tiny_run_config, monkeypatch):
    monkeypatch.setattr(phases, "capacities", lambda device: (None, 10 * 1024 ** 2))
    events = list(run(tiny_run_config))
    assert events[-1].status == "failed"
    (error,) = _notices(events, "error")
    assert error.startswith("memory:") and "of host memory" in error
    # 10 MiB is under the runtime alone: no flag helps, so none is offered, only how much memory the run needs
    assert "no setting brings it under 0.01 GiB" in error and "use a machine with at least" in error
    assert "--nsamples" not in error and "--batch-size" not in error


def test_a_cublas_allocation_failure_is_out_of_memory_too(tiny_run_config, monkeypatch):
    """cuBLAS and cuSOLVER raise a plain RuntimeError when their workspace cannot be allocated."""
    _fail_at_block(monkeypatch, 1, RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    events = list(run(tiny_run_config))
    (error,) = _notices(events, "error")
    assert "out of device memory in block 1 of ebft" in error and "--batch-size" in error
    assert "internal error" not in error and "--resume" in error


@pytest.mark.parametrize("where,expected,unwanted", [
    ("eval", "out of device memory in the evaluation of dense; use a shorter --eval-seqlen", "--batch-size"),
    ("prune", "out of device memory in block 0 of ebft; try --activations host", "--batch-size"),
])
def test_the_remedy_is_the_one_for_the_stage_that_ran_out(tiny_run_config, monkeypatch, where, expected, unwanted):
    """Only EBFT training reacts to --batch-size: an evaluation is told to use shorter windows (a new run), a
    block's pruning pass to move activations to the host (which --resume may change)."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    target = {"eval": (phases, "perplexity"), "prune": (pruners.MaskPruner, "prune")}[where]
    monkeypatch.setattr(*target, oom)
    events = list(run(tiny_run_config))
    assert events[-1].status == "failed"
    (error,) = _notices(events, "error")
    assert error.startswith(expected) and unwanted not in error
    assert ("--resume" in error) == (where == "prune")
