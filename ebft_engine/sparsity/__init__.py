"""Pruning methods (a registry: one file per method), patterns and activation statistics."""
from . import dsnot, magnitude, sparsegpt, wanda  # noqa: F401  (registers the methods)
from .patterns import lowest_in_layer, lowest_per_row, n_of_m, prune_count, select
from .registry import LayerStats, MaskResult, PruneMethod, available_methods, get_method, register
from .stats import StatsCollector

__all__ = ["LayerStats", "MaskResult", "PruneMethod", "StatsCollector", "available_methods", "get_method",
           "lowest_in_layer", "lowest_per_row", "n_of_m", "prune_count", "register", "select"]
