"""Pruners: the block loop asks one for every block's sparsity (its allocation) and for each block's masks.

- :class:`MaskPruner` wraps a method of the mask registry (``sparsity/``: magnitude, wanda, sparsegpt,
  sparsegpt-mask, dsnot; one file each) at one sparsity for every block.
- :class:`OwlPruner` is any mask pruner with OWL's per-block allocation (``owl-<method>``).
- :class:`StructuredPruner` is LLM-Pruner: it removes whole heads and MLP channels, so the block shrinks and
  there are no masks to hold; the first and last blocks stay whole.

``make_pruner(name, prune_config)`` builds the one a method name asks for; ``pruner_names()`` lists them.
"""
from __future__ import annotations

import time
from typing import Generator

import torch
from torch import nn

from .config import OWL_PREFIX, STRUCTURED_METHODS, PruneConfig
from .device import non_finite
from .events import Event, Notice
from .loop import BlockMasks, BlockRun, check_cancelled, embed_calibration, forward
from .sparsity import StatsCollector, available_methods, get_method
from .sparsity import structured as st
from .sparsity.owl import OWL_BOUNDS, owl_sparsities, owl_spread
from .sparsity.wanda import wanda_scores


class MaskPruner:
    """A registered mask method at the same sparsity in every block (unstructured or N:M)."""

    structured = False

    def __init__(self, name: str, cfg: PruneConfig):
        self.name, self.cfg, self.method = name, cfg, get_method(name)
        self.needs = self.method.needs_with(cfg)

    def allocate(self, run: BlockRun, label: str, start: int) -> Generator[Event, None, list[float]]:
        return [self.cfg.sparsity] * run.adapter.num_blocks
        yield  # a generator that emits nothing

    def prune(self, run: BlockRun, block: nn.Module, index: int, stats: StatsCollector,
              sparsity: float) -> BlockMasks:
        """Mask every linear layer of ``block`` in place (SparseGPT also updates the kept weights)."""
        device, out = run.precision.device, BlockMasks()
        for name, linear in run.adapter.linears(block).items():
            result = self.method.fn(linear.weight.data, stats.layer_stats(name), sparsity, self.cfg.nm, layer=name,
                                    cfg=self.cfg)
            with torch.no_grad():
                if result.weight is not None:
                    linear.weight.copy_(result.weight)
                linear.weight.mul_(result.mask.to(linear.weight.device))
            out.masks[linear.weight] = result.mask.to(device)
            if result.dead_inputs is not None:
                out.dead[name] = out.masks[linear.weight] & result.dead_inputs.to(device)
        return out


class OwlPruner:
    """A mask pruner whose per-block sparsities follow OWL (docs/methods/owl.md#outlier-ratio): each block's outlier
    ratio of Wanda scores over all its projections, from a pass over the dense model, spread ±λ around the
    target with the same mean."""

    structured = False

    def __init__(self, inner: MaskPruner):
        self.inner, self.name, self.needs, self.cfg = inner, OWL_PREFIX + inner.name, inner.needs, inner.cfg

    def allocate(self, run: BlockRun, label: str, start: int) -> Generator[Event, None, list[float]]:
        # from the dense model, before any block of this variant is pruned or restored
        cfg, stream, ratios = self.cfg, embed_calibration(run), []
        for i, block in enumerate(run.adapter.blocks):
            check_cancelled(run)
            run.stage, run.where = "block", f"block {i} of OWL's dense pass"
            block.to(run.precision.device)
            stats, linears = StatsCollector(frozenset({"input_norms"})), run.adapter.linears(block)
            with stats.attach(linears):
                stream, _ = forward(run, block, stream, stats=stats)
            block.to("cpu")
            scores = torch.cat([wanda_scores(layer.weight.data, stats.layer_stats(name).input_norms).flatten()
                                for name, layer in linears.items()])
            ratios.append(100.0 * float((scores > cfg.owl_m * scores.mean()).sum()) / scores.numel())
        yield Notice("info", "OWL outlier ratios (%): " + ", ".join(f"{x:.2f}" for x in ratios))
        raw = owl_spread(ratios, cfg.sparsity, cfg.owl_lambda)
        lo, hi = min(OWL_BOUNDS[0], cfg.sparsity), max(OWL_BOUNDS[1], cfg.sparsity)
        clamped = [i for i, x in enumerate(raw) if not lo <= x <= hi]
        if clamped:
            yield Notice("warning", f"OWL: λ={cfg.owl_lambda:g} spreads the sparsity of block(s) "
                         f"{', '.join(map(str, clamped))} beyond [{lo:g}, {hi:g}] "
                         f"({', '.join(f'{raw[i]:.3f}' for i in clamped)}): clamped, and the other blocks "
                         f"take the difference so that the mean stays {cfg.sparsity:g}")
        sparsities = owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda)
        yield Notice("info", f"OWL per-block sparsity for {label}: " +
                     ", ".join(f"{s:.3f}" for s in sparsities))
        return sparsities

    def prune(self, run: BlockRun, block: nn.Module, index: int, stats: StatsCollector,
              sparsity: float) -> BlockMasks:
        return self.inner.prune(run, block, index, stats, sparsity)


class StructuredPruner:
    """LLM-Pruner (docs/methods/llm-pruner.md#taylor-importance): Taylor importance of heads and channels from the dense
    model, then each block between keep_first and keep_last shrinks by one ratio so the total removed is the
    target."""

    structured, needs = True, frozenset()

    def __init__(self, name: str, cfg: PruneConfig):
        self.name, self.cfg, self.scores = name, cfg, None

    def allocate(self, run: BlockRun, label: str, start: int) -> Generator[Event, None, list[float]]:
        cfg, n_blocks = self.cfg, run.adapter.num_blocks
        pruned = st.pruned_blocks(n_blocks, cfg.keep_first, cfg.keep_last)
        ratio = st.block_ratio(cfg.sparsity, [sum(d.values()) for d in run.dense_numel], pruned)
        if start < n_blocks:  # from the dense model, before any block of this variant is pruned or restored
            run.stage, run.where = "importance", "the importance pass of structured pruning"
            t = time.perf_counter()
            ids = run.calib_ids[:cfg.taylor_samples, :cfg.taylor_seqlen]
            try:
                self.scores = st.taylor_importance(run.model, run.adapter.blocks, pruned, ids, run.precision)
            except FloatingPointError:
                raise non_finite(run.precision, "the dense model's loss in the importance pass of structured "
                                                "pruning") from None
            yield Notice("info", f"structured pruning: Taylor importance of heads and channels in blocks "
                                 f"{pruned[0]}-{pruned[-1]} from {ids.shape[0]} x {ids.shape[1]} calibration "
                                 f"tokens in {time.perf_counter() - t:.1f} s")
        return [ratio if i in pruned else 0.0 for i in range(n_blocks)]

    def prune(self, run: BlockRun, block: nn.Module, index: int, stats: StatsCollector,
              sparsity: float) -> BlockMasks:
        """Remove the block's least important heads and channels (its matrices get smaller)."""
        if sparsity <= 0:
            return BlockMasks()
        kept = st.choose(block, self.scores[index], sparsity)
        st.shrink(block, kept)
        return BlockMasks(kept=kept.to_dict())


def make_pruner(name: str, cfg: PruneConfig) -> MaskPruner | OwlPruner | StructuredPruner:
    """The pruner for a method name: a registered mask method, owl-<method>, or a structured method."""
    if name in STRUCTURED_METHODS:
        return StructuredPruner(name, cfg)
    if name.startswith(OWL_PREFIX):
        return OwlPruner(MaskPruner(name[len(OWL_PREFIX):], cfg))
    return MaskPruner(name, cfg)


def pruner_names() -> list[str]:
    """Every method name make_pruner accepts, OWL's variants written out."""
    masks = available_methods()
    return masks + list(STRUCTURED_METHODS) + [OWL_PREFIX + m for m in masks]
