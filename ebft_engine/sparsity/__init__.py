"""Pruning methods (a registry: one file per method), patterns and activation statistics.

Every module of this package other than the shared ones (patterns, registry, stats) is a method that registers
itself when imported: adding a method is adding a file here (``register`` in registry.py).
"""
import importlib
import pkgutil

from .patterns import lowest_in_layer, lowest_per_row, n_of_m, prune_count, select
from .registry import LayerStats, MaskResult, PruneMethod, available_methods, get_method, register
from .stats import StatsCollector

SHARED = {"patterns", "registry", "stats", "structured", "owl"}  # helpers, not methods
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LayerStats", "MaskResult", "PruneMethod", "StatsCollector", "available_methods", "get_method",
           "lowest_in_layer", "lowest_per_row", "n_of_m", "prune_count", "register", "select"]
