"""DSnoT (Zhang et al., ICLR 2024; docs/methods/dsnot.md#the-swap-rule): training-free mask refinement. Starting
from an initial mask (Wanda by default), each cycle swaps, in every row whose expected reconstruction error is
still large, one pruned weight back in and one kept weight out. Weights are never changed.

For row i, with μ̃_j the token-sum mean of input channel j (Σ over tokens / number of sequences) and Var_j its
population variance over tokens:

- contribution D_ij = W_ij · μ̃_j; the row's expected error ε_i = Σ_{j pruned} D_ij (dense minus sparse);
- regrow: the pruned j with the largest D_ij / Var_j (ε_i > 0) or the most negative (ε_i < 0);
- prune: the kept j whose D_ij has the opposite sign to ε_i, lowest Wanda score first;
- ε_i ← ε_i + D_prune − D_regrow; a row stops for good once |ε_i| ≤ 0.1 (token-sum units) or after 50 cycles.

Candidates are re-ranked every cycle over the current mask (the reference sorts them once); Var is exact over
all calibration tokens (the reference averages per-batch variances). For N:M, the regrown weight's group gives
up its lowest-scoring other kept member, and a swap that would flip the sign of ε_i ends that row (the
reference applies that test only on this path). By default only the attention projections are refined and
the MLP keeps its initial mask, as the reference code does (``--skip_layer mlp``); ``prune.dsnot_layers: all``
refines every projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import option
from .registry import LayerStats, MaskResult, get_method, register
from .wanda import wanda_scores

MAX_CYCLES = 50
THRESHOLD = 0.1
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DSNOT_INITS = ("wanda", "sparsegpt-mask", "magnitude")


@dataclass(frozen=True)
class DsnotOptions:
    dsnot_init: str = option("wanda", "the mask DSnoT refines: wanda, sparsegpt-mask or magnitude",
                             choices=DSNOT_INITS, fix="DSnoT refines a mask from one of wanda, sparsegpt-mask, "
                                                      "magnitude", label="DSnoT refines")
    dsnot_layers: str = option("attention", "attention (reference default: q, k, v, o only) or all",
                               choices=("attention", "all"), label="DSnoT layers",
                               fix="use attention (the reference default: q, k, v, o only) or all")


def _needs(cfg) -> frozenset[str]:
    init = getattr(cfg, "dsnot_init", "wanda")
    return frozenset({"input_norms", "moments"}) | get_method(init).needs


@register("dsnot", needs=("input_norms", "moments"), description="DSnoT mask refinement of an initial mask",
          needs_for=_needs, options=DsnotOptions, rank=4)
def dsnot(weight: torch.Tensor, stats: LayerStats, sparsity: float, nm, layer: str = "", cfg=None,
          **_) -> MaskResult:
    init = get_method(getattr(cfg, "dsnot_init", "wanda"))
    initial = init.fn(weight, stats, sparsity, nm, layer=layer, cfg=cfg)
    if getattr(cfg, "dsnot_layers", "attention") == "attention" and layer not in ATTENTION:
        return MaskResult(initial.mask)  # the MLP keeps its initial mask (the reference's default)
    mask = refine(weight, initial.mask, stats.input_norms, stats.token_mean_sum, stats.token_var, nm)
    return MaskResult(mask)


@torch.no_grad()
def refine(weight: torch.Tensor, mask: torch.Tensor, input_norms: torch.Tensor, mean_sum: torch.Tensor,
           var: torch.Tensor, nm: tuple[int, int] | None, max_cycles: int = MAX_CYCLES,
           threshold: float = THRESHOLD) -> torch.Tensor:
    """The refined keep-mask; every row keeps exactly as many weights as it had (per N:M group for N:M)."""
    w = weight.float()
    mask = mask.clone()
    d = w * mean_sum.float().unsqueeze(0)  # (out, in) signed contributions
    regrow_metric = d / var.float().clamp_min(1e-12).unsqueeze(0)
    score = wanda_scores(weight, input_norms)
    eps = (d * ~mask).sum(1)
    active = eps.abs() > threshold
    rows = torch.arange(w.shape[0], device=w.device)
    inf = torch.tensor(float("inf"), device=w.device)
    for _ in range(max_cycles):
        if not active.any():
            break
        positive = eps > 0
        # regrow: among pruned, the largest metric where eps > 0, the smallest where eps < 0
        signed = torch.where(positive.unsqueeze(1), regrow_metric, -regrow_metric)
        signed = torch.where(mask, -inf, signed)
        regrow = signed.argmax(1)
        has_regrow = torch.isfinite(signed[rows, regrow])
        if nm is None:
            # prune: among kept with D of the opposite sign to eps, the lowest Wanda score
            opposite = torch.where(positive.unsqueeze(1), d < 0, d > 0)
            candidates = torch.where(mask & opposite, score, inf)
            prune = candidates.argmin(1)
            has_prune = torch.isfinite(candidates[rows, prune])
        else:
            m = nm[1]
            group = (regrow // m).unsqueeze(1) * m + torch.arange(m, device=w.device).unsqueeze(0)  # (out, m)
            in_group = torch.where(mask.gather(1, group), score.gather(1, group), inf)
            pick = in_group.argmin(1)
            prune = group[rows, pick]
            has_prune = torch.isfinite(in_group[rows, pick])
        new_eps = eps + d[rows, prune] - d[rows, regrow]
        go = active & has_regrow & has_prune
        if nm is not None:  # the sign test of the N:M path: a swap may not flip the sign of the error
            flips = torch.sign(new_eps) != torch.sign(eps)
            active = active & ~(go & flips)
            go = go & ~flips
        stuck = active & ~go  # nothing left to swap in this row
        idx = rows[go]
        mask[idx, regrow[go]] = True
        mask[idx, prune[go]] = False
        eps = torch.where(go, new_eps, eps)
        active = active & ~stuck & (eps.abs() > threshold)
    return mask

