"""The one home of the shape arithmetic: a block's projection shapes, its weights and the model's parameter
count, from a config alone (no weights are read).

Each family's adapter says what its blocks look like (:meth:`BlockAdapter.projection_shapes`); everything that
counts weights (``count_params``, the memory planner's ``Shape``, structured pruning's per-block sizes) adds up
from here. ``counts`` (heads, kv_heads, channels) describes a block that was structurally pruned.
"""
from __future__ import annotations

from typing import Any

from .adapters import adapter_for_config


def config_counts(config: Any) -> dict[str, int]:
    """The heads, key/value heads and MLP channels the config gives every block."""
    return adapter_for_config(config).config_counts(config)


def projection_shapes(config: Any, counts: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each of a block's projections (``head_dim`` is the config's own where it
    has one, as in Qwen3: not hidden / heads)."""
    return adapter_for_config(config).projection_shapes(config, counts)


def dense_shapes(config: Any, counts: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a block before any pruning: from the model's config,
    or with ``counts`` for a block that was loaded already smaller (see ``loading.loaded_counts``)."""
    return projection_shapes(config, counts)


def dense_numel(config: Any, counts: dict[str, int] | None = None) -> dict[str, int]:
    """The weights each projection of a block has before any pruning (``counts``: see :func:`dense_shapes`)."""
    return {name: n_in * n_out for name, (n_in, n_out) in dense_shapes(config, counts).items()}


def block_params(config: Any) -> int:
    """Weights of one block: its projections and its norm vectors (biases and q/k norms, where a family has
    them, are too few to count)."""
    return sum(dense_numel(config).values()) + adapter_for_config(config).block_norm_params(config)


def count_params(config: Any) -> int:
    """Parameter count of a config, without building the model: embeddings, LM head unless tied, the blocks and
    the final norm."""
    h, v = config.hidden_size, config.vocab_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else v * h
    return v * h + head + config.num_hidden_layers * block_params(config) + h
