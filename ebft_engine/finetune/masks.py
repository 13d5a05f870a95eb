"""Masks learned inside the block reconstruction (``ebft-mask``; docs/methods/ebft-mask.md).

While a block trains towards its target, each pruned projection's mask may change: a prune-and-regrow schedule
(after RigL, Evci et al. 2020) run inside the block's reconstruction, with the pruner's mask as the start and the
pruner's pattern kept exactly after every step.

- The kept weights train as in fixed-mask EBFT (AdamW; a pruned weight's gradient is zeroed, its value is zero).
- Every pruned position has a **latent** value, what it would be if kept: its dense value (before pruning), or
  the trained value it had when it left the mask.
- After each optimiser step the mask is projected again from the saliency ``|w_ij| · ‖X_j‖`` (Wanda's score, of
  the trained weight where kept, of the latent value where pruned) onto the pruner's pattern: N of every M
  consecutive inputs, or the same count per row (when the pruner kept a fixed count per row, as Wanda does) or
  per layer (magnitude, SparseGPT, ALPS). As the kept weights train, the ones the block no longer needs shrink
  and are swapped for pruned weights whose dense saliency now ranks higher. Only the best swaps are taken, at
  most ``swap`` of the kept weights per step at first, decaying to none (a cosine); a weight that enters takes
  its latent value.
- After ``settle`` of the block's steps the mask freezes; the rest of the block is fixed-mask EBFT, so the block
  ends with an exact mask and its pruned weights exactly zero.

Ties (zeros included) are broken in favour of the pruner's mask, so the first forward pass is exactly the pruned
block. Regrowing by the reconstruction gradient instead (RigL's rule: the latent values descending the gradient
at the pruned positions) was measured and made every block worse (docs/methods/ebft-mask.md#what-was-tried).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SETTLE = 0.75  # fraction of a block's steps during which the mask may change (RigL stops updates at 75%)
SWAP = 0.1  # at most this fraction of a layer's kept weights is swapped per step at the start, decaying to 0
PRIOR_BONUS = 1e-30  # added to the prior's saliency: breaks ties (zeros included) in favour of the pruner's mask


@dataclass
class LearnedLayer:
    """One masked projection whose mask is learned.

    Attributes:
        linear: the projection; its ``weight`` (out, in), float32, is zero wherever ``mask`` is False.
        prior: (out, in) bool, the pruner's keep-mask.
        mask: (out, in) bool, the current keep-mask.
        saliency: (in,) float32 ``‖X_j‖`` of the projection's input columns over the calibration set.
        per_row: keep the prior's count in every row (else in the whole layer); ignored for N:M.
        latent: (out, in) float32: the value a pruned position would take if kept (zero where kept).
    """

    linear: nn.Linear
    prior: torch.Tensor
    mask: torch.Tensor
    saliency: torch.Tensor
    per_row: bool
    latent: torch.Tensor


def fixed_row_count(mask: torch.Tensor) -> bool:
    """Whether every row of ``mask`` keeps the same number of weights (a per-row pruner's mask)."""
    counts = mask.sum(dim=1)
    return bool((counts == counts[0]).all())


def project(scores: torch.Tensor, prior: torch.Tensor, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """The keep-mask of the pattern that keeps the highest ``scores`` with as many kept weights as ``prior``.

    Args:
        scores: (out, in) non-negative saliencies (already carrying the prior's tie-break bonus).
        prior: (out, in) bool, whose counts (per group of M, per row or per layer) the result keeps.
        nm: (N, M) for N of every M consecutive input weights, else None (unstructured).
        per_row: unstructured only: the count of every row (else of the whole layer).

    Returns:
        (out, in) bool keep-mask.
    """
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        groups = scores.reshape(rows, cols // m, m)
        idx = torch.topk(groups, n, dim=2).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    if per_row:
        k = int(prior[0].sum())
        idx = torch.topk(scores, k, dim=1).indices
        return torch.zeros_like(prior).scatter_(1, idx, True)
    k = int(prior.sum())
    mask = torch.zeros(prior.numel(), dtype=torch.bool, device=prior.device)
    mask[torch.topk(scores.flatten(), k).indices] = True
    return mask.view_as(prior)


def limit_swaps(mask: torch.Tensor, new: torch.Tensor, scores: torch.Tensor, share: float,
                nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """``new`` with only the best swaps taken, at most ``share`` of the kept weights (of each row, per row):
    the weights that enter with the highest scores and those that leave with the lowest (N:M: the groups whose
    kept score rises most). Counts stay exact: as many weights enter as leave, in each row or group.

    Args:
        mask / new: (out, in) bool, the current keep-mask and its full projection (``project``).
        scores: (out, in) the saliencies ``new`` was projected from.
    """
    if nm is not None:
        rows, cols = mask.shape
        m = nm[1]
        gain = ((new.float() - mask.float()) * scores).reshape(rows, cols // m, m).sum(-1).flatten()
        budget = int(share * gain.numel())
        moved = gain > 0
        if int(moved.sum()) > budget:
            allowed = torch.zeros_like(moved)
            allowed[torch.topk(torch.where(moved, gain, -1.0), budget).indices] = True
            moved &= allowed
        keep_new = moved.reshape(rows, cols // m, 1).expand(rows, cols // m, m).reshape(rows, cols)
        return torch.where(keep_new, new, mask)
    enter, leave = new & ~mask, mask & ~new
    if per_row:
        budget = min(int(share * int(mask[0].sum())), mask.shape[1])
        if budget == 0:
            return mask.clone()
        take = torch.clamp(enter.sum(1, keepdim=True), max=budget)  # (out, 1) swaps in each row
        chosen = torch.arange(budget, device=mask.device) < take  # (out, budget): the first `take` of each row
        best_in = torch.topk(torch.where(enter, scores, -torch.inf), budget, dim=1).indices
        worst_out = torch.topk(torch.where(leave, scores, torch.inf), budget, dim=1, largest=False).indices
        added = torch.zeros_like(mask).scatter_(1, best_in, chosen)
        removed = torch.zeros_like(mask).scatter_(1, worst_out, chosen)
        return (mask & ~removed) | added
    budget = min(int(share * int(mask.sum())), int(enter.sum()))
    flat_in = torch.where(enter, scores, -torch.inf).flatten()
    flat_out = torch.where(leave, scores, torch.inf).flatten()
    out = mask.clone().flatten()
    if budget:
        out[torch.topk(flat_in, budget).indices] = True
        out[torch.topk(flat_out, budget, largest=False).indices] = False
    return out.view_as(mask)


class MaskLearner:
    """Learns the masks of one block while it trains (see the module's text).

    Use: pass ``grad_masks`` as the trainer's masks and ``after_step`` as its hook, then ``finish(rolled_back)``
    for the final masks.
    """

    def __init__(self, layers: list[LearnedLayer], nm: tuple[int, int] | None, settle: float = SETTLE,
                 swap: float | None = SWAP):
        self.layers, self.nm, self.settle, self.swap = layers, nm, settle, swap
        self.total = sum(layer.mask.numel() for layer in layers)
        # the trainer's masks: the current ones, read at every step (pruned gradients zeroed, weights baked)
        self.grad_masks: dict[nn.Parameter, torch.Tensor] = {layer.linear.weight: layer.mask for layer in layers}
        self.frozen = False

    @classmethod
    def for_block(cls, linears: dict[str, nn.Linear], masks: dict[nn.Parameter, torch.Tensor],
                  saliency: dict[str, torch.Tensor], nm: tuple[int, int] | None, settle: float = SETTLE, swap: float | None = SWAP,
                  dense: dict[str, torch.Tensor] | None = None) -> MaskLearner:
        """A learner for every projection of ``linears`` that has a mask in ``masks``.

        Args:
            saliency: short name -> (in,) input column norms ``‖X_j‖``.
            dense: short name -> (out, in) weights before pruning, where the latent weights start (else zero).
        """
        layers = []
        for name, linear in linears.items():
            prior = masks.get(linear.weight)
            if prior is not None:
                start = dense[name] if dense is not None else torch.zeros_like(linear.weight)
                latent = start.to(linear.weight.device, torch.float32) * ~prior
                layers.append(LearnedLayer(linear, prior, prior.clone(), saliency[name].float(),
                                           nm is None and fixed_row_count(prior), latent))
        return cls(layers, nm, settle, swap)

    def after_step(self, step: int, total_steps: int) -> float:
        """After optimiser step ``step`` of ``total_steps``: project the masks again (or freeze them once
        ``settle`` of the steps are done); return the fraction of masked weights this step flipped."""
        if self.frozen:
            return 0.0
        settle_step = math.ceil(self.settle * total_steps)
        if step >= settle_step:  # the masks are fixed: the rest of the block is fixed-mask EBFT
            self.frozen = True
            return 0.0
        share = None if self.swap is None else self.swap * 0.5 * (1 + math.cos(math.pi * step / settle_step))
        flipped = 0
        with torch.no_grad():
            for layer in self.layers:
                flipped += self._swap(layer, share)
        return flipped / max(self.total, 1)

    def _swap(self, layer: LearnedLayer, share: float | None) -> int:
        weight = layer.linear.weight
        values = torch.where(layer.mask, weight.float(), layer.latent)
        scores = values.abs() * layer.saliency.to(weight.device) + layer.prior * PRIOR_BONUS
        new = project(scores, layer.prior, self.nm, layer.per_row)
        if share is not None:
            new = limit_swaps(layer.mask, new, scores, share, self.nm, layer.per_row)
        enter, leave = new & ~layer.mask, layer.mask & ~new
        weight[enter] = values[enter].to(weight.dtype)  # an entering weight takes its latent value
        layer.latent[enter] = 0
        layer.latent[leave] = weight[leave].float()  # a leaving one keeps its value as its latent
        weight[leave] = 0
        layer.mask.copy_(new)  # in place: the trainer's grad_masks see it
        return int(enter.sum() + leave.sum())

    def finish(self, rolled_back: bool) -> dict[nn.Parameter, torch.Tensor]:
        """End of the block: parameter -> final keep-mask; the prior when training rolled back (the caller
        restores the pruned weights), else the learned masks."""
        if rolled_back:
            return {layer.linear.weight: layer.prior for layer in self.layers}
        self.frozen = True
        return {layer.linear.weight: layer.mask for layer in self.layers}

    def mask_change(self) -> float:
        """The fraction of masked weights whose final state differs from the prior's."""
        differ = sum(int((layer.mask != layer.prior).sum()) for layer in self.layers)
        return differ / max(self.total, 1)
