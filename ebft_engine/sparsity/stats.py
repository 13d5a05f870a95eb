"""Collect the activation statistics pruning methods need, with forward hooks during the dense pass.

Linears that read the same tensor (q/k/v, gate/up) share one set of statistics.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..models import INPUT_GROUPS
from .registry import LayerStats


class StatsCollector:
    """Accumulates, per input group, Σ‖x_j‖² and/or Σ XᵀX over calibration sequences."""

    def __init__(self, needs: frozenset[str], groups: tuple[tuple[str, ...], ...] = INPUT_GROUPS):
        """``groups``: the block's projections by the input they read (the adapter's ``input_groups``; the
        LLaMA family's by default): one hook and one set of statistics per group."""
        self.needs, self.groups = needs, groups
        self.sq_norms: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.x_sum: dict[str, torch.Tensor] = {}  # float64 Σx and Σx² over tokens (DSnoT's moments)
        self.x_sq_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.sequences = 0
        self.enabled = True  # off while the forward pass runs over sequences that must not count (see pipeline)
        self._stats: dict[str, LayerStats] = {}

    def _hook(self, group: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output) -> None:
            if not self.enabled:
                return
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()  # (batch*seq, in)
            with torch.autocast(device_type=x.device.type, enabled=False):  # XᵀX in float32, not bf16
                self._accumulate(group, x)

        return hook

    def _accumulate(self, group: str, x: torch.Tensor) -> None:
        if "input_norms" in self.needs:
            s = (x * x).sum(0)
            self.sq_norms[group] = self.sq_norms[group] + s if group in self.sq_norms else s
        if "hessian" in self.needs:
            h = x.T @ x
            self.xtx[group] = self.xtx[group] + h if group in self.xtx else h
        if "moments" in self.needs:
            s1, s2 = x.sum(0, dtype=torch.float64), (x.double() ** 2).sum(0)
            self.x_sum[group] = self.x_sum[group] + s1 if group in self.x_sum else s1
            self.x_sq_sum[group] = self.x_sq_sum[group] + s2 if group in self.x_sq_sum else s2
            self.tokens[group] = self.tokens.get(group, 0) + x.shape[0]

    @contextlib.contextmanager
    def attach(self, linears: dict[str, nn.Linear]) -> Iterator[StatsCollector]:
        handles = [] if not self.needs else [
            linears[group[0]].register_forward_hook(self._hook(group[0])) for group in self.groups]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def count(self, sequences: int) -> None:
        """Record how many calibration sequences the forward pass just saw."""
        self.sequences += sequences

    def layer_stats(self, name: str) -> LayerStats:
        """The statistics of ``name``'s input; layers reading the same input get the same object."""
        group = next(g[0] for g in self.groups if name in g)
        if group not in self._stats:
            n = max(self.sequences, 1)
            norms = self.sq_norms[group] / n if group in self.sq_norms else None
            hessian = self.xtx[group] * (2.0 / n) if group in self.xtx else None
            mean_sum = var = None
            if group in self.x_sum:
                t = self.tokens[group]
                mean = self.x_sum[group] / t
                var = (self.x_sq_sum[group] / t - mean ** 2).clamp_min(0).float()
                mean_sum = (self.x_sum[group] / n).float()
            self._stats[group] = LayerStats(input_norms=norms, hessian=hessian, token_mean_sum=mean_sum,
                                            token_var=var)
        return self._stats[group]
