"""Where the evaluation's hidden states live (issue #12): on the device or in pinned host memory, the perplexity is
bit-identical to running every block over all windows' states in host memory; the host buffer is allocated (and
on CUDA pinned) once per evaluation, not once per block; batch i+1 is fetched before batch i runs."""
from __future__ import annotations

import math

import pytest
import torch

from ebft_engine import evaluate
from ebft_engine.device import Precision, host_tensor, release_pinned_cache
from ebft_engine.evaluate import _batches, eval_windows, perplexity
from ebft_engine.models import LlamaAdapter

FP32_CPU = Precision(torch.device("cpu"), torch.float32, None)
BF16_CPU = Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16)


def _ids(windows: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, windows * seqlen + 5), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _reference_nll(adapter: LlamaAdapter, ids: torch.Tensor, seqlen: int, precision: Precision,
                   batch_size: int) -> float:
    """The mean window NLL as the evaluation computed it before the placement choice: every window embedded at
    once on the host, each block run over batches of them, outputs written back in place."""
    chunks, _ = eval_windows(ids, seqlen, None)
    hidden = adapter.embed(chunks).to(precision.storage)
    kwargs = adapter.block_kwargs(seqlen, precision.device, precision.storage)
    for block in adapter.blocks:
        for start in range(0, hidden.shape[0], batch_size):
            with precision.autocast():
                out = adapter.call_block(block, hidden[start:start + batch_size], kwargs).to(hidden.dtype)
            hidden[start:start + batch_size] = out
    return evaluate._window_nll(adapter, hidden, chunks, precision).mean().item()


@pytest.mark.parametrize("precision", [FP32_CPU, BF16_CPU], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("hidden_on", ["device", "host"])
def test_perplexity_is_bit_identical_wherever_the_states_live(tiny_llama, precision, hidden_on):
    """5 windows in batches of 2: the last batch is short, so a batch written to the wrong rows, or a prefetch one
    batch off, changes the number."""
    model = tiny_llama.to(precision.storage)
    adapter, ids = LlamaAdapter(model), _ids(5, 24)
    expected = _reference_nll(adapter, ids, 24, precision, batch_size=2)
    result = perplexity(adapter, ids, 24, precision, batch_size=2, hidden_on=hidden_on)
    assert result.windows == 5
    assert result.ppl == math.exp(expected)


def test_both_placements_give_the_same_perplexity(tiny_llama):
    adapter, ids = LlamaAdapter(tiny_llama), _ids(3, 32)
    on_device = perplexity(adapter, ids, 32, FP32_CPU, batch_size=2, hidden_on="device")
    on_host = perplexity(adapter, ids, 32, FP32_CPU, batch_size=2, hidden_on="host")
    assert on_device.ppl == on_host.ppl


def test_the_host_states_are_allocated_once_per_evaluation_not_per_block(tiny_llama, monkeypatch):
    """The model has two blocks: one allocation for both. Nothing is pinned after the fact (Tensor.pin_memory,
    a copy per call) either: the one buffer is created pinned (host_tensor, on CUDA)."""
    assert len(tiny_llama.model.layers) == 2
    calls: list[tuple] = []
    pins: list[None] = []

    def counting(shape, dtype, device):
        calls.append(shape)
        return host_tensor(shape, dtype, device)

    monkeypatch.setattr(evaluate, "host_tensor", counting)
    monkeypatch.setattr(evaluate, "release_pinned_cache", lambda device: calls.append("released"))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pins.append(None) or self)
    adapter, ids = LlamaAdapter(tiny_llama), _ids(3, 32)
    perplexity(adapter, ids, 32, FP32_CPU, batch_size=2, hidden_on="host")
    assert calls == [(3, 32, 64), "released"] and pins == []  # handed back once the evaluation is done
    perplexity(adapter, ids, 32, FP32_CPU, batch_size=2, hidden_on="device")
    assert calls == [(3, 32, 64), "released"]  # the states on the device: no host buffer at all


def test_host_tensor_is_pinned_for_cuda_only(monkeypatch):
    seen: list[bool] = []
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kwargs):
        seen.append(pin_memory)
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    host_tensor((2, 3), torch.bfloat16, torch.device("cuda"))
    plain = host_tensor((2, 3), torch.bfloat16, torch.device("cpu"))
    assert seen == [True, False] and plain.shape == (2, 3) and plain.dtype == torch.bfloat16


def test_the_pinned_cache_is_emptied_on_cuda_only(monkeypatch):
    """torch keeps freed pinned blocks cached: on CUDA they are handed back; on the CPU nothing was pinned (and
    asking torch would raise without an accelerator)."""
    emptied: list[None] = []
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: emptied.append(None), raising=False)
    release_pinned_cache(torch.device("cpu"))
    assert emptied == []
    release_pinned_cache(torch.device("cuda"))
    assert emptied == [None]


class _Rows:
    """Stands for (n, seqlen, hidden) states and logs each batch's copy to the device."""

    def __init__(self, n: int, log: list[str]):
        self.shape, self.log = (n, 1, 1), log

    def __getitem__(self, rows: slice):
        log = self.log

        class _Batch:
            def to(self, device, non_blocking=False):
                log.append(f"copy {rows.start}")
                return rows.start

        return _Batch()


def test_host_batches_are_copied_one_batch_ahead():
    """Batch i+1's copy is asked for before batch i is handed to the block (on CUDA it then runs on a side stream
    while batch i computes); the states on the device are handed out as views, never copied."""
    log: list[str] = []
    for rows, x in _batches(_Rows(5, log), 2, torch.device("cpu"), prefetch=True):
        log.append(f"run {x}")
        assert x == rows.start
    assert log == ["copy 0", "copy 2", "run 0", "copy 4", "run 2", "run 4"]
    states = torch.arange(5.0).view(5, 1, 1)
    views = list(_batches(states, 2, torch.device("cpu"), prefetch=False))
    assert [v.data_ptr() for _, v in views] == [states[r].data_ptr() for r in (slice(0, 2), slice(2, 4), slice(4, 5))]


def test_an_unknown_placement_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="hidden_on"):
        perplexity(LlamaAdapter(tiny_llama), _ids(1, 16), 16, FP32_CPU, hidden_on="disk")


@pytest.mark.parametrize("where", ["device", "host"])
def test_the_run_evaluates_where_its_memory_plan_put_the_states(monkeypatch, where):
    """phases.evaluate hands the plan's choice (MemoryPlan.eval_hidden) to perplexity."""
    from types import SimpleNamespace

    from ebft_engine import phases
    from ebft_engine.evaluate import PerplexityResult

    seen: dict = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return PerplexityResult(ppl=2.0, windows=1, total_windows=1, seqlen=8)

    monkeypatch.setattr(phases, "perplexity", fake)
    run = SimpleNamespace(adapter=None, eval_ids=None, eval_seqlen=8, precision=FP32_CPU, cancelled=lambda: False,
                          config=SimpleNamespace(eval=SimpleNamespace(windows=None, source="wikitext2")),
                          plan=SimpleNamespace(eval_hidden=where), summary=SimpleNamespace(ppl={}),
                          write_summary=lambda: None)
    list(phases.evaluate(run, "dense"))
    assert seen["hidden_on"] == where and run.summary.ppl == {"dense": 2.0}
