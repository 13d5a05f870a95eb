"""One adapter per architecture family, registered by ``config.model_type``.

A family is a class following :class:`~.base.BlockAdapter` (one module here per family); adding one is writing
its module and naming its class in :data:`FAMILIES`. Everything else in the engine reaches a model's layout,
shapes and structured surgery through :func:`adapter_for` (a model), :func:`adapter_for_config` (a config, no
weights) or :func:`adapter_for_block` (one decoder layer).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import ModelLoadError
from .base import BlockAdapter, BlockStructure, unsupported_message
from .llama import LlamaAdapter

FAMILIES: tuple[type, ...] = (LlamaAdapter,)
ADAPTERS: dict[str, type] = {model_type: family for family in FAMILIES for model_type in family.model_types}
# model_type values EBFT Lab runs.
SUPPORTED_TYPES = tuple(ADAPTERS)


def adapter_for_config(config: Any) -> type[BlockAdapter]:
    """The adapter class of ``config``'s family (its shapes and surgery need no model); ModelLoadError, naming
    what is supported, for any other architecture."""
    model_type = getattr(config, "model_type", None)
    family = ADAPTERS.get(model_type)
    if family is None:
        raise ModelLoadError(unsupported_message(model_type, FAMILIES))
    return family


def adapter_for(model: nn.Module) -> BlockAdapter:
    """An adapter running ``model`` block by block (built once per loaded model: it probes the model's forward)."""
    return adapter_for_config(model.config)(model)


def adapter_for_block(block: nn.Module) -> type[BlockAdapter]:
    """The adapter class of the family a decoder layer belongs to."""
    for family in FAMILIES:
        if family.owns(block):
            return family
    raise ModelLoadError(f"model: a block of type {type(block).__name__} belongs to no supported family")


def check_architecture(config: Any) -> None:
    """Refuse (ModelLoadError) a config whose architecture no adapter covers."""
    adapter_for_config(config)


__all__ = ["ADAPTERS", "BlockAdapter", "BlockStructure", "FAMILIES", "LlamaAdapter", "SUPPORTED_TYPES",
           "adapter_for", "adapter_for_block", "adapter_for_config", "check_architecture"]
