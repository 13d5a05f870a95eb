"""Perplexity over non-overlapping windows (docs/evaluation.md#perplexity), block by block.

``ppl = exp(Σ_w NLL_w · seqlen / (n · seqlen))`` where NLL_w is the mean cross-entropy of window w's
seqlen−1 next-token predictions: the Wanda/SparseGPT/EBFT protocol. Blocks run one at a time on the device
(the model stays in host memory) over the hidden states of all windows, kept on the device when the memory
planner finds room for them there, else in pinned host memory with each batch copied up one batch ahead; the
cross-entropy is chunked so the full vocabulary's logits for a window never sit in memory at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .device import Precision, check_finite, host_tensor, non_finite, release_pinned_cache
from .errors import Cancelled
from .models import LlamaAdapter

HEAD_CHUNK = 256  # tokens per lm_head + cross-entropy chunk
EVAL_BATCH = 4  # windows per block call while evaluating
INFER_BATCH = 8  # calibration sequences per block call when no gradient is needed (pruning passes, propagation)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int
    total_windows: int
    seqlen: int

    @property
    def tokens(self) -> int:
        return self.windows * self.seqlen

    @property
    def partial(self) -> bool:
        return self.windows < self.total_windows


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None) -> tuple[torch.Tensor, int]:
    """(n, seqlen) windows of a (1, N) stream, the tail dropped; and the number of full windows there are."""
    total = ids.shape[1] // seqlen
    n = total if windows is None else min(windows, total)
    return ids[0, : n * seqlen].view(n, seqlen), total


@torch.no_grad()
def perplexity(adapter: LlamaAdapter, ids: torch.Tensor, seqlen: int, precision: Precision,
               windows: int | None = None, batch_size: int = EVAL_BATCH,
               cancelled: Callable[[], bool] = lambda: False, label: str = "the model",
               hidden_on: str = "host") -> PerplexityResult:
    """Perplexity of the model behind ``adapter`` on the first ``windows`` windows of ``ids`` (all if None).

    Args:
        ids: (1, N) token ids; cut into (n, seqlen) windows, the tail dropped (:func:`eval_windows`).
        batch_size: windows per block call.
        hidden_on: where the windows' hidden states, (n, seqlen, hidden) in the storage dtype, live between
            blocks: ``"device"`` (each block reads and overwrites them in place: no host-device traffic) or
            ``"host"`` (allocated once, pinned on CUDA, reused for every block and released at the end; batch
            i+1 is copied to the device non-blocking on a side stream while batch i runs, and each output is
            copied straight back into its rows). The memory planner chooses (``MemoryPlan.eval_hidden``); the
            perplexity is the same either way.

    Raises:
        ValueError: ``hidden_on`` is neither "device" nor "host".
        EbftError: (a ConfigError on ``dtype`` in float16) when a block's output or the perplexity is not
            finite: a NaN is never returned as a measurement.
        Cancelled: ``cancelled()`` answered True before a block.
    """
    if hidden_on not in ("device", "host"):
        raise ValueError(f"hidden_on must be 'device' or 'host', not {hidden_on!r}")
    chunks, total = eval_windows(ids, seqlen, windows)
    dev = precision.device
    hidden = _embedded(adapter, chunks, batch_size, precision.storage, dev, hidden_on)  # (n, seqlen, hidden)
    try:
        _run_blocks(adapter, hidden, seqlen, precision, batch_size, cancelled, label, prefetch=hidden_on == "host")
        nll = _window_nll(adapter, hidden, chunks, precision).mean().item()
    finally:
        del hidden  # the pinned buffer goes back to torch's cache of pinned memory, and from there to the system:
        if hidden_on == "host":  # it must not outlive the evaluation (the planner counts it in this phase only)
            release_pinned_cache(dev)
    if not math.isfinite(nll) or nll > 700:  # exp(709.8) is the largest finite float64
        raise non_finite(precision, f"the perplexity of {label} (mean log-loss {nll:.4g})")
    return PerplexityResult(ppl=math.exp(nll), windows=chunks.shape[0], total_windows=total, seqlen=seqlen)


def _run_blocks(adapter: LlamaAdapter, hidden: torch.Tensor, seqlen: int, precision: Precision, batch_size: int,
                cancelled: Callable[[], bool], label: str, prefetch: bool) -> None:
    """Carry ``hidden`` (n, seqlen, hidden) through every block, one block on the device at a time, in place."""
    dev = precision.device
    kwargs = adapter.block_kwargs(seqlen, dev, precision.storage)
    for i, block in enumerate(adapter.blocks):
        if cancelled():
            raise Cancelled()
        block.to(dev)
        try:
            for rows, x in _batches(hidden, batch_size, dev, prefetch):
                with precision.autocast():
                    out = adapter.call_block(block, x, kwargs).to(hidden.dtype)
                check_finite(out, precision, f"the output of block {i} in the evaluation of {label}")
                hidden[rows].copy_(out, non_blocking=True)  # into pinned memory: ordered on the current stream
        finally:
            block.to("cpu")
    if prefetch and dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()  # the last outputs are in host memory before it is read


def _embedded(adapter: LlamaAdapter, chunks: torch.Tensor, batch_size: int, storage: torch.dtype,
              dev: torch.device, hidden_on: str) -> torch.Tensor:
    """Block 0's inputs for (n, seqlen) ``chunks``: (n, seqlen, hidden) in ``storage``, on ``dev`` or in host
    memory (:func:`device.host_tensor`: pinned on CUDA, allocated once here). The embeddings are computed on
    the host a batch at a time and copied into place, so no second full-size copy ever exists."""
    n = chunks.shape[0]
    first = adapter.embed(chunks[:batch_size])  # (b, seqlen, hidden); b is 0 when there are no windows
    shape = (n, *first.shape[1:])
    if hidden_on == "device":
        hidden = torch.empty(shape, dtype=storage, device=dev)
    else:
        hidden = host_tensor(shape, storage, dev)
    hidden[:batch_size].copy_(first)
    for start in range(batch_size, n, batch_size):
        hidden[start:start + batch_size].copy_(adapter.embed(chunks[start:start + batch_size]))
    return hidden


def _batches(hidden: torch.Tensor, batch_size: int, dev: torch.device,
             prefetch: bool) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, the block's input) for each batch of ``batch_size`` windows of ``hidden`` (n, seqlen, hidden).

    Without ``prefetch`` (the states are on ``dev``) the input is a view of ``hidden``'s rows. With it, the
    input is a copy on ``dev``, and batch i+1's copy is started before batch i is handed out: on CUDA on a
    side stream, non-blocking from pinned memory, after everything already queued on the current stream (the
    previous block's write-backs into those rows); the current stream waits for that copy only when it takes
    the batch. On the CPU ``.to`` returns the rows themselves: plain tensors, no copy.
    """
    n = hidden.shape[0]
    spans = [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if not prefetch:
        for rows in spans:
            yield rows, hidden[rows]
        return
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def fetch(rows: slice) -> tuple[torch.Tensor, Any]:
        if side is None:
            return hidden[rows].to(dev), None
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            x = hidden[rows].to(dev, non_blocking=True)
        return x, side.record_event()

    ahead = fetch(spans[0]) if spans else None
    for k, rows in enumerate(spans):
        x, copied = ahead
        if k + 1 < len(spans):
            ahead = fetch(spans[k + 1])  # runs while batch k computes
        if copied is not None:
            current = torch.cuda.current_stream(dev)
            current.wait_event(copied)
            x.record_stream(current)  # allocated on the side stream, used on the current one
        yield rows, x


def _window_nll(adapter: LlamaAdapter, hidden: torch.Tensor, ids: torch.Tensor, precision: Precision) -> torch.Tensor:
    """(n,) mean next-token cross-entropy of each window, logits upcast to float32."""
    dev = precision.device
    norm, head = adapter.model.model.norm.to(dev), adapter.lm_head.to(dev)
    out = torch.zeros(ids.shape[0], dtype=torch.float64)
    try:
        for w in range(ids.shape[0]):
            targets = ids[w, 1:].to(dev)
            total = 0.0
            for start in range(0, targets.shape[0], HEAD_CHUNK):
                h = hidden[w, start:start + HEAD_CHUNK].to(dev)[: targets.shape[0] - start]
                with precision.autocast():
                    logits = head(norm(h))
                total += F.cross_entropy(logits.float(), targets[start:start + HEAD_CHUNK], reduction="sum").item()
            out[w] = total / targets.shape[0]
    finally:
        norm.to("cpu")
        head.to("cpu")
    return out
