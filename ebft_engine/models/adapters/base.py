"""What an architecture family's adapter provides: the :class:`BlockAdapter` protocol, and the family-neutral
description of a structurally pruned block (:class:`BlockStructure`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class BlockStructure:
    """What one pruned block keeps: query heads, key/value heads and MLP channels, as sorted indices."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    channels: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"heads": list(self.heads), "kv_heads": list(self.kv_heads), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockStructure:
        return cls(tuple(int(i) for i in d["heads"]), tuple(int(i) for i in d["kv_heads"]),
                   tuple(int(i) for i in d["channels"]))


@runtime_checkable
class BlockAdapter(Protocol):
    """An architecture family, as the engine sees it.

    An instance wraps one loaded ``*ForCausalLM`` and calls it piece by piece (embed, each block, final norm and
    head). The class itself (what :func:`~ebft_engine.models.adapters.adapter_for_config` returns) answers what
    needs no model: the blocks' shapes from a config, and the surgery structured pruning does on a block.

    Counts (``dict[str, int]``) are a block's ``heads``, ``kv_heads`` and ``channels`` (MLP width).
    """

    family: ClassVar[str]  # a name for messages: "LLaMA"
    model_types: ClassVar[tuple[str, ...]]  # the config.model_type values the family covers
    blocks_path: ClassVar[str]  # where the ModuleList of blocks lives in the model ("model.layers")
    linear_names: ClassVar[tuple[str, ...]]  # the prunable projections of a block, in display order
    input_groups: ClassVar[tuple[tuple[str, ...], ...]]  # projections reading the same input tensor
    # each projection's structured-pruning group kind (heads, kv_heads, channels) and the weight axis along
    # which its groups lie (0: output rows, 1: input columns)
    group_axes: ClassVar[dict[str, tuple[str, int]]]

    model: nn.Module
    config: Any
    blocks: nn.ModuleList

    # --- running a model block by block (an instance) ---
    @property
    def num_blocks(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def lm_head(self) -> nn.Linear: ...
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def block_kwargs(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> Any: ...
    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: Any) -> torch.Tensor: ...
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    # --- the family's layout and shapes (no model needed) ---
    @staticmethod
    def owns(block: nn.Module) -> bool: ...
    @classmethod
    def layers(cls, model: nn.Module) -> nn.ModuleList: ...
    @staticmethod
    def linears(block: nn.Module) -> dict[str, nn.Linear]: ...
    @staticmethod
    def config_counts(config: Any) -> dict[str, int]: ...
    @staticmethod
    def projection_shapes(config: Any, counts: dict[str, int] | None = None) -> dict[str, tuple[int, int]]: ...
    @staticmethod
    def block_norm_params(config: Any) -> int: ...
    @staticmethod
    def counts(block: nn.Module) -> dict[str, int]: ...
    @staticmethod
    def head_dim(block: nn.Module) -> int: ...
    @staticmethod
    def group_numel(block: nn.Module) -> dict[str, int]: ...

    # --- structured surgery on a block ---
    @staticmethod
    def shrink(block: nn.Module, structure: BlockStructure) -> None: ...
    @classmethod
    def regrow(cls, block: nn.Module, config: Any, counts: dict[str, int] | None = None) -> bool: ...
    @staticmethod
    def first_n(block: nn.Module, counts: dict[str, int]) -> BlockStructure: ...


def unsupported_message(model_type: Any, families) -> str:
    """Why a model is refused: its model_type, and the families (adapter classes) that are supported."""
    supported = "; ".join(f"the {a.family} family ({', '.join(a.model_types)})" for a in families)
    return f"model: architecture {model_type!r} is not supported; EBFT Lab supports {supported}"


# --- Linear surgery any family's adapter uses ---

def head_rows(head_dim: int, heads) -> torch.Tensor:
    """The rows (or columns) of a projection that belong to ``heads``, each ``head_dim`` wide."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller Linear holding the chosen output rows or input columns of ``linear``."""
    w = linear.weight.detach()
    w = w if rows is None else w.index_select(0, rows.to(w.device))
    w = w if cols is None else w.index_select(1, cols.to(w.device))
    out = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=linear.bias is not None,
                                   device=w.device, dtype=w.dtype)
    out.weight.requires_grad_(False)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            b = linear.bias.detach()
            out.bias.requires_grad_(False)
            out.bias.copy_(b if rows is None else b.index_select(0, rows.to(b.device)))
    return out


def empty_linear(n_in: int, n_out: int, like: nn.Linear) -> nn.Linear:
    """An uninitialised Linear of the given shape on ``like``'s device and dtype, with a bias if it has one
    (its contents are for the caller to restore)."""
    return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=like.bias is not None, device=like.weight.device,
                                    dtype=like.weight.dtype).requires_grad_(False)
