"""The registries: every pruning method, per-block allocation and recovery the engine knows, by name.

A method registers itself from its own module (``sparsity/<name>.py`` for a mask method, ``pruners/`` for one
that shrinks blocks or allocates sparsity, ``recoveries/`` for a recovery), with a one-line description and
its options as a small frozen dataclass whose fields are settings of the ``prune`` section (each field's
``metadata`` gives its help text, choices and bounds: :func:`option`). Everything else reads this module:
config validation (names and options), the CLI's flags and help, the lab's choices, the planner's statistics
and the conformance tests. Adding a method is adding one file.

This module imports nothing of the engine (no torch): ``config.py`` reads it. The method packages are imported
on first use of a lookup (:func:`_discover`), so the registries are complete whoever asks first.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError

# The packages whose modules register methods, imported on first lookup (each imports its own modules).
PLUGIN_PACKAGES = ("ebft_engine.sparsity", "ebft_engine.pruners", "ebft_engine.recoveries")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None,
           strict: bool = False, fix: str | None = None, label: str | None = None) -> Any:
    """A field of a method's options dataclass: a ``prune.<field name>`` setting (``--<field-name>`` flag).

    Args:
        default: its value when not given.
        help: one line for ``--help``, the README and the lab's tooltip.
        choices: the allowed strings; ``minimum`` (and ``strict`` for > instead of >=) bounds a number.
        fix: the remedy an error states when the value is refused (default: derived from help).
        label: the lab's label for it.
    """
    meta = {"help": help, "choices": choices, "minimum": minimum, "strict": strict, "fix": fix, "label": label}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PruningEntry:
    """A pruning method or a per-block allocation.

    Attributes:
        kind: "mask" (unstructured or N:M masks, one layer at a time: sparsity/), "structured" (removes whole
            heads and channels: the pattern is ``structured``) or "allocation" (per-block sparsities for any
            mask method, written ``<name>-<method>``, e.g. owl-wanda).
        options: a frozen dataclass of :func:`option` fields, or None.
        build: ``build(name, prune_config)`` -> the pruner (pruners/) for structured methods and allocations
            (``build(inner_pruner, prune_config)``); mask methods are all run by ``pruners.MaskPruner``.
    """

    name: str
    kind: str
    description: str
    options: type | None = None
    build: Callable[..., Any] | None = None
    rank: int = 100  # where lists show it (simplest first); ties keep registration order


@dataclass(frozen=True)
class RecoveryEntry:
    """A recovery: ``build()`` -> the object the block loop and the run call (recoveries/)."""

    name: str
    description: str
    build: Callable[[], Any]
    labels: tuple[str, ...] = ()  # the models it reports (default: its name)
    rank: int = 100


_PRUNING: dict[str, PruningEntry] = {}
_RECOVERIES: dict[str, RecoveryEntry] = {}
_discovered = False


def add_pruning(entry: PruningEntry) -> PruningEntry:
    if entry.kind not in ("mask", "structured", "allocation"):
        raise ValueError(f"unknown kind {entry.kind!r} for {entry.name}")
    _PRUNING[entry.name] = entry
    return entry


def add_recovery(entry: RecoveryEntry) -> RecoveryEntry:
    _RECOVERIES[entry.name] = entry
    return entry


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for package in PLUGIN_PACKAGES:
            importlib.import_module(package)


def pruning_entries(kind: str | None = None) -> list[PruningEntry]:
    """Every registered pruning entry (of one ``kind``), in registration order."""
    _discover()
    return sorted((e for e in _PRUNING.values() if kind is None or e.kind == kind), key=lambda e: e.rank)


def pruning_entry(name: str) -> PruningEntry | None:
    _discover()
    return _PRUNING.get(name)


def method_names() -> list[str]:
    """Every ``--method`` value: the mask and structured methods, then ``<allocation>-<mask method>``."""
    masks = [e.name for e in pruning_entries("mask")]
    return masks + [e.name for e in pruning_entries("structured")] + [
        f"{a.name}-{m}" for a in pruning_entries("allocation") for m in masks]


def split_method(name: str) -> tuple[PruningEntry | None, PruningEntry | None]:
    """(allocation, method) of a ``--method`` value; (None, None) for a name that is not registered."""
    entry = pruning_entry(name)
    if entry is not None and entry.kind != "allocation":
        return None, entry
    for allocation in pruning_entries("allocation"):
        prefix = allocation.name + "-"
        inner = pruning_entry(name[len(prefix):]) if name.startswith(prefix) else None
        if inner is not None and inner.kind == "mask":
            return allocation, inner
    return None, None


def is_structured(name: str) -> bool:
    _allocation, method = split_method(name)
    return method is not None and method.kind == "structured"


def recovery_entries() -> list[RecoveryEntry]:
    _discover()
    return sorted(_RECOVERIES.values(), key=lambda e: e.rank)


def recovery_entry(name: str) -> RecoveryEntry | None:
    _discover()
    return _RECOVERIES.get(name)


def active_recoveries(cfg) -> list:
    """The recoveries ``cfg.recoveries`` names that run under ``cfg`` (their ``active``: EBFT with epochs > 0),
    built, in order."""
    return [r for r in (recovery_entry(name).build() for name in cfg.recoveries) if r.active(cfg)]


def variant_count(cfg) -> int:
    """How many variants a run of ``cfg`` prunes the model for: each baseline, then each active recovery from
    --method's masks, or --method alone when no recovery runs and it is not a baseline (runner.Run.variants)."""
    recoveries = len(active_recoveries(cfg))
    return len(cfg.baselines) + (recoveries or int(cfg.prune.method not in cfg.baselines))


# ---- options ----------------------------------------------------------------------------------------------
def option_fields() -> dict[str, tuple[PruningEntry, dataclasses.Field]]:
    """Every ``prune.<name>`` option of every registered method: name -> (its method, its field)."""
    out: dict[str, tuple[PruningEntry, dataclasses.Field]] = {}
    for entry in pruning_entries():
        for f in dataclasses.fields(entry.options) if entry.options else ():
            if f.name in out and out[f.name][0] is not entry:
                raise ValueError(f"option {f.name!r} of {entry.name} is already an option of {out[f.name][0].name}")
            out[f.name] = (entry, f)
    return out


def option_defaults() -> dict[str, Any]:
    return {name: f.default for name, (_entry, f) in option_fields().items()}


def check_option(name: str, value: Any) -> Any:
    """``value`` for ``prune.<name>`` converted to the option's type and checked against its bounds and
    choices; ConfigError naming the field and the fix otherwise."""
    _entry, f = option_fields()[name]
    meta, key, kind = f.metadata, f"prune.{name}", str(f.type)
    fix = meta.get("fix") or f"use {meta['help']}"
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(meta['choices'])}", fix)
        return value
    if "int" in kind or "float" in kind:
        value = _number(key, value, whole="int" in kind and "float" not in kind, fix=fix)
        low = meta.get("minimum")
        if low is not None and (value < low or (meta.get("strict") and value <= low)):
            raise ConfigError(key, f"{value:g} is {'not above' if meta.get('strict') else 'below'} {low:g}", fix)
    return value


def _number(key: str, value: Any, whole: bool, fix: str) -> int | float:
    if isinstance(value, str):
        try:
            value = int(value) if whole else float(value)
        except ValueError:
            raise ConfigError(key, f"{value!r} is not a {'whole number' if whole else 'number'}", fix) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
        raise ConfigError(key, f"{value!r} is not a {'whole number' if whole else 'finite number'}", fix)
    if not math.isfinite(value):
        raise ConfigError(key, f"{value!r} is not a finite number", fix)
    return value if whole else float(value)
