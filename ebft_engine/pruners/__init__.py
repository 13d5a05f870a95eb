"""Pruners: the block loop asks one for every block's sparsity (its allocation) and for each block's masks.

- ``mask.MaskPruner`` runs any registered mask method (``sparsity/``, one file each) at one sparsity everywhere;
- an allocation (``owl.py``: OWL) gives a mask method per-block sparsities, written ``owl-<method>``;
- a structured method (``llm_pruner.py``) removes whole heads and channels, so the block shrinks.

Every module of this package registers what it defines (``registry.add_pruning``): a new allocation or
structured method is a new file here. ``make_pruner(name, prune_config)`` builds the pruner a name asks for.
"""
from __future__ import annotations

import importlib
import pkgutil

from .. import registry
from ..config import PruneConfig
from .mask import MaskPruner

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def make_pruner(name: str, cfg: PruneConfig):
    """The pruner for a ``--method`` value: a registered mask method, <allocation>-<method>, or a structured
    method (config validation has already refused any other name)."""
    allocation, method = registry.split_method(name)
    pruner = method.build(name, cfg) if method.build is not None else MaskPruner(method.name, cfg)
    return allocation.build(pruner, cfg) if allocation is not None else pruner


__all__ = ["MaskPruner", "make_pruner"]
