"""Pruning methods by name. A method maps (weight, statistics, sparsity, pattern) to a keep-mask, and
optionally to updated weights (only SparseGPT updates weights). Adding a method is adding one file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import registry as engine_registry
from ..errors import ConfigError
from ..registry import PruningEntry


@dataclass(frozen=True)
class LayerStats:
    """Activation statistics of one linear layer's inputs, from the dense pass over the calibration set.

    Attributes:
        input_norms: (in_features,) mean over sequences of the squared L2 norm of each input column (Wanda).
        hessian: (in_features, in_features) ``2/N Σ XᵀX`` in float32 (SparseGPT), N counted in sequences.
        token_mean_sum: (in_features,) Σ over tokens of x_j divided by the number of sequences (DSnoT's μ̃).
        token_var: (in_features,) population variance of x_j over all tokens (DSnoT).
    """

    input_norms: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    token_mean_sum: torch.Tensor | None = None
    token_var: torch.Tensor | None = None
    _derived: dict = field(default_factory=dict, compare=False, repr=False)

    def derived(self, key: str, compute: Callable[[], object]):
        """A value computed from these statistics once and shared by every layer that reads the same input
        (q, k and v share one inverse Hessian factor)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]


@dataclass(frozen=True)
class MaskResult:
    mask: torch.Tensor  # bool, True = kept
    weight: torch.Tensor | None = None  # updated weights (SparseGPT), already zero where the mask is False
    # bool (in_features,): input columns whose weights the method set to zero because they never fire (SparseGPT
    # zeroes dead inputs, as the reference does): kept by the mask yet zero, they lift the measured sparsity
    dead_inputs: torch.Tensor | None = None


@dataclass(frozen=True)
class PruneMethod:
    """``fn(weight, stats, sparsity, nm, layer=name, cfg=prune_config)`` returns a MaskResult."""

    name: str
    needs: frozenset[str]  # statistics the method reads: "input_norms", "hessian", "moments"
    fn: Callable[..., MaskResult]
    description: str = ""
    needs_for: Callable[[object], frozenset[str]] | None = None  # when the options change what it reads

    def needs_with(self, cfg) -> frozenset[str]:
        return self.needs_for(cfg) if self.needs_for is not None else self.needs


_METHODS: dict[str, PruneMethod] = {}


def register(name: str, needs: tuple[str, ...] = (), description: str = "", needs_for=None,
             options: type | None = None, rank: int = 100):
    """Register a mask method under ``name`` (its module's name, by convention), the decorated function its
    kernel. ``needs``: the statistics it reads ("input_norms", "hessian", "moments"; ``needs_for(prune_config)``
    when its options change them); ``options``: a frozen dataclass of ``registry.option`` fields, its
    ``prune.<field>`` settings (CLI flags, lab controls and validation follow from it); ``rank``: where lists
    show it."""
    def wrap(fn):
        _METHODS[name] = PruneMethod(name, frozenset(needs), fn, description, needs_for)
        engine_registry.add_pruning(PruningEntry(name, "mask", description, options, rank=rank))
        return fn

    return wrap


def get_method(name: str) -> PruneMethod:
    if name not in _METHODS:
        raise ConfigError("prune.method", f"unknown method {name!r}", f"choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return list(_METHODS)
