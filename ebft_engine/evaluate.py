"""Perplexity over non-overlapping windows (docs/evaluation.md#perplexity), block by block.

``ppl = exp(Σ_w NLL_w · seqlen / (n · seqlen))`` where NLL_w is the mean cross-entropy of window w's
seqlen−1 next-token predictions: the Wanda/SparseGPT/EBFT protocol. Blocks run one at a time on the device
(the model stays in host memory) and the cross-entropy is chunked so the full vocabulary's logits for a
window never sit in memory at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .device import Precision, check_finite, non_finite
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
               cancelled: Callable[[], bool] = lambda: False, label: str = "the model") -> PerplexityResult:
    """Perplexity of the model behind ``adapter`` on the first ``windows`` windows of ``ids`` (all if None).

    Raises:
        EbftError: (a ConfigError on ``dtype`` in float16) when a block's output or the perplexity is not
            finite: a NaN is never returned as a measurement.
    """
    chunks, total = eval_windows(ids, seqlen, windows)
    dev = precision.device
    hidden = adapter.embed(chunks).to(precision.storage)  # (n, seqlen, hidden) on the host
    kwargs = adapter.block_kwargs(seqlen, dev, precision.storage)
    for i, block in enumerate(adapter.blocks):
        if cancelled():
            raise Cancelled()
        block.to(dev)
        try:
            for start in range(0, hidden.shape[0], batch_size):
                x = hidden[start:start + batch_size].to(dev)
                with precision.autocast():
                    out = adapter.call_block(block, x, kwargs).to(hidden.dtype)
                check_finite(out, precision, f"the output of block {i} in the evaluation of {label}")
                hidden[start:start + batch_size] = out.to(hidden.device)
        finally:
            block.to("cpu")
    nll = _window_nll(adapter, hidden, chunks, precision).mean().item()
    if not math.isfinite(nll) or nll > 700:  # exp(709.8) is the largest finite float64
        raise non_finite(precision, f"the perplexity of {label} (mean log-loss {nll:.4g})")
    return PerplexityResult(ppl=math.exp(nll), windows=chunks.shape[0], total_windows=total, seqlen=seqlen)


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
