"""Recoveries: what a pruned block, or the whole pruned model, is trained towards.

``base.PruneOnly`` is the pruned baseline (no training); every other module registers its recoveries
(``registry.add_recovery``): ``ebft.py`` (ebft, ebft-gp), ``lora.py`` (lora). A recovery is an object with:

- ``phase`` ("ebft" or "prune") and ``trains`` (whether blocks train), ``active(config)``, ``labels(label)``
  (the models it reports);
- for the block loop: ``begin``, ``targets`` (also where the pruner's statistics are taken), ``diverges``,
  ``recover`` (train and propagate one block);
- for the run: ``after(run, label)``, once every block is done (evaluate; LoRA trains the whole model first).

A new recovery is a new file here. ``make_recovery(name)`` builds one (None: the pruned baseline).
"""
from __future__ import annotations

import importlib
import pkgutil

from .. import registry
from .base import PruneOnly

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def make_recovery(name: str | None) -> PruneOnly:
    """The recovery registered as ``name``; None for a pruned baseline."""
    return PruneOnly() if name is None else registry.recovery_entry(name).build()


__all__ = ["PruneOnly", "make_recovery"]
