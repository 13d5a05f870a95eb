"""The LLaMA family (llama, mistral, qwen2, qwen3): where its models keep their blocks, embeddings, rotary
position embeddings, final norm and head, how a block is called, its projections' shapes, and the surgery
structured pruning does on a block.

It calls the stock transformers modules: no copied modeling file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ModelLoadError
from ..attention import REPEAT_KV
from .base import BlockStructure, empty_linear, head_rows, sliced_linear, unsupported_message

# model_type values whose decoder layers share the LLaMA layout and call signature.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The seven projections of a block, in the order the lab shows them.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}
# Linears that read the same input tensor: their activation statistics are computed once per group.
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# Structured pruning's groups: a query head is rows of q and columns of o, a key/value head rows of k and v, an
# MLP channel a row of gate and of up and a column of down.
GROUP_AXES = {"q_proj": ("heads", 0), "k_proj": ("kv_heads", 0), "v_proj": ("kv_heads", 0), "o_proj": ("heads", 1),
              "gate_proj": ("channels", 0), "up_proj": ("channels", 0), "down_proj": ("channels", 1)}

# The keyword arguments a decoder layer receives from its model's forward that depend on the sequence alone,
# and those left out because calibration and training run whole sequences without a cache. Anything else a
# model hands its blocks is refused at load: dropping it would compute another model.
BLOCK_ARGUMENTS = ("attention_mask", "position_ids", "position_embeddings")
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "use_cache", "cache_position")


class _Capture(nn.Module):
    """Stands in for a decoder layer during :meth:`LlamaAdapter.block_kwargs`: records its keyword arguments
    and passes the hidden states through."""

    def __init__(self, sink: list[dict[str, Any]]):
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise ModelLoadError("model: its forward passes positional arguments to its blocks; EBFT Lab cannot "
                                 "run this model block by block")
        self.sink.append(kwargs)
        return hidden_states


@dataclass(frozen=True)
class BlockKwargs:
    """Each block's call arguments (:data:`BLOCK_ARGUMENTS`), by the block's layer index."""

    per_layer: list[dict[str, Any]]

    def of(self, block: nn.Module) -> dict[str, Any]:
        return self.per_layer[block.self_attn.layer_idx]


def _moved(captured: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The block arguments of each captured call on ``device``; a tensor shared by several layers is moved once."""
    moved: dict[int, Any] = {}

    def to_device(value):
        if isinstance(value, torch.Tensor):
            return moved.setdefault(id(value), value.to(device))
        if isinstance(value, tuple):
            return tuple(to_device(v) for v in value)
        return value

    return [{k: to_device(v) for k, v in kw.items() if k in BLOCK_ARGUMENTS} for kw in captured]


class LlamaAdapter:
    """Calls a LLaMA-family model piece by piece: embed, each block, final norm and head.

    Args:
        model: a ``*ForCausalLM`` from transformers whose ``model_type`` is in MODEL_TYPES.
    """

    family = "LLaMA"
    model_types = MODEL_TYPES
    blocks_path = "model.layers"
    linear_names = LINEAR_NAMES
    input_groups = INPUT_GROUPS
    group_axes = GROUP_AXES

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in self.model_types:
            raise ModelLoadError(unsupported_message(model_type, (LlamaAdapter,)))
        if model.config._attn_implementation not in ("sdpa", REPEAT_KV):
            # Eager attention with attention_mask=None is not causal in transformers 5; SDPA infers is_causal.
            # (models/attention.py: the load picks REPEAT_KV, SDPA on repeated key/value heads, before sm80.)
            model.config._attn_implementation = "sdpa"
        self.model = model
        self.config = model.config
        self.blocks: nn.ModuleList = self.layers(model)
        self.block_kwargs(2, torch.device("cpu"), torch.float32)  # refuses, at load, what it cannot reproduce

    # --- running the model block by block ---

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, hidden) inputs of block 0."""
        return self.model.model.embed_tokens(input_ids)

    def block_kwargs(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> BlockKwargs:
        """What every block is called with for sequences of ``seqlen`` tokens (no padding), as the model's own
        forward builds it: position ids, rotary (cos, sin) of the model's rope type and scaling, and each
        layer's attention mask (causal, or a sliding window for Mistral's ``sliding_window`` and the
        ``sliding_attention`` layers of Qwen2/Qwen3's ``layer_types``).

        The arguments are captured from the model's own ``forward`` on zero embeddings of shape
        (1, seqlen, hidden), with the blocks swapped for stand-ins that record what they receive: the mask and
        position logic is transformers', never a copy, so block-by-block execution computes what the model
        computes. Masks have batch size 1 and broadcast over any batch.
        """
        captured: list[dict[str, Any]] = []
        stand_ins = nn.ModuleList(_Capture(captured) for _ in self.blocks)
        base = self.model.model
        layers, base.layers = base.layers, stand_ins
        try:
            with torch.no_grad():
                probe = torch.zeros(1, seqlen, self.config.hidden_size, dtype=dtype)
                base(inputs_embeds=probe, use_cache=False)
        finally:
            base.layers = layers
        if len(captured) != len(self.blocks):
            raise ModelLoadError(f"model: its forward called {len(captured)} of its {len(self.blocks)} blocks; "
                                 "EBFT Lab cannot run this model block by block")
        unknown = sorted({k for kw in captured for k, v in kw.items()
                          if k not in BLOCK_ARGUMENTS + CACHE_ARGUMENTS and v is not None})
        if unknown:
            raise ModelLoadError(f"model: its forward passes {', '.join(unknown)} to every block, which EBFT Lab "
                                 "does not reproduce block by block; this model is not supported")
        return BlockKwargs(_moved(captured, device))

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: BlockKwargs) -> torch.Tensor:
        out = block(hidden, **kwargs.of(block))
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm then LM head: (batch, seq, hidden) -> (batch, seq, vocab) logits."""
        return self.model.lm_head(self.model.model.norm(hidden))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(hidden)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    # --- layout and shapes ---

    @staticmethod
    def owns(block: nn.Module) -> bool:
        """Whether ``block`` is a decoder layer of this family (its attention module knows its config)."""
        attn = getattr(block, "self_attn", None)
        return getattr(getattr(attn, "config", None), "model_type", None) in MODEL_TYPES

    @classmethod
    def layers(cls, model: nn.Module) -> nn.ModuleList:
        """The model's blocks, without building an adapter (no forward pass)."""
        return model.get_submodule(cls.blocks_path)

    @staticmethod
    def linears(block: nn.Module) -> dict[str, nn.Linear]:
        """The seven prunable projections of a block, by short name."""
        return {name: block.get_submodule(path) for name, path in LINEAR_PATHS.items()}

    @staticmethod
    def config_counts(config) -> dict[str, int]:
        """The heads, key/value heads and MLP channels the config gives every block."""
        heads = config.num_attention_heads
        return {"heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
                "channels": config.intermediate_size}

    @staticmethod
    def projection_shapes(config, counts: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each of a block's seven projections, from the config.

        ``head_dim`` is the config's own where it has one (Qwen3, Mistral variants: not hidden / heads). ``counts``
        (heads, kv_heads, channels) gives a block that was structurally pruned.
        """
        h = config.hidden_size
        dense = LlamaAdapter.config_counts(config)
        hd = getattr(config, "head_dim", None) or h // dense["heads"]
        c = counts or dense
        heads, kv, f = c["heads"], c["kv_heads"], c["channels"]
        return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    @staticmethod
    def block_norm_params(config) -> int:
        """A block's weights outside its projections that are counted: its two RMSNorm vectors (biases and q/k
        norms, where a family member has them, are too few to count)."""
        return 2 * config.hidden_size

    @staticmethod
    def head_dim(block: nn.Module) -> int:
        return block.self_attn.head_dim

    @staticmethod
    def counts(block: nn.Module) -> dict[str, int]:
        """A block's heads, key/value heads and MLP channels as its shapes say."""
        attn, hd = block.self_attn, block.self_attn.head_dim
        return {"heads": attn.q_proj.out_features // hd, "kv_heads": attn.k_proj.out_features // hd,
                "channels": block.mlp.gate_proj.out_features}

    @staticmethod
    def group_numel(block: nn.Module) -> dict[str, int]:
        """The weights one group of each kind holds: a query head (its q rows and o columns), a key/value head
        (its k and v rows), an MLP channel (a row of gate and of up, a column of down)."""
        hd, hidden = block.self_attn.head_dim, block.self_attn.q_proj.in_features
        return {"heads": 2 * hd * hidden, "kv_heads": 2 * hd * hidden, "channels": 3 * hidden}

    # --- structured surgery ---

    @staticmethod
    def shrink(block: nn.Module, structure: BlockStructure) -> None:
        """Make ``block`` keep only ``structure``'s heads and channels, in place (its Linear modules are replaced
        by smaller ones). The block still computes with the same code: the head count follows from the shapes."""
        attn, mlp = block.self_attn, block.mlp
        q, kv = head_rows(attn.head_dim, structure.heads), head_rows(attn.head_dim, structure.kv_heads)
        attn.q_proj, attn.o_proj = sliced_linear(attn.q_proj, rows=q), sliced_linear(attn.o_proj, cols=q)
        attn.k_proj, attn.v_proj = sliced_linear(attn.k_proj, rows=kv), sliced_linear(attn.v_proj, rows=kv)
        attn.num_key_value_groups = len(structure.heads) // len(structure.kv_heads)
        ch = torch.as_tensor(list(structure.channels), dtype=torch.long)
        mlp.gate_proj, mlp.up_proj = sliced_linear(mlp.gate_proj, rows=ch), sliced_linear(mlp.up_proj, rows=ch)
        mlp.down_proj = sliced_linear(mlp.down_proj, cols=ch)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(structure.channels)

    @classmethod
    def regrow(cls, block: nn.Module, config, counts: dict[str, int] | None = None) -> bool:
        """Give a shrunk block its dense shapes back (new Linear modules, contents to be restored by the caller):
        the config's, or ``counts``' for a block that was loaded smaller; return whether anything changed."""
        changed = False
        for name, (n_in, n_out) in cls.projection_shapes(config, counts).items():
            owner_path, attr = LINEAR_PATHS[name].rsplit(".", 1)
            owner = block.get_submodule(owner_path)
            old = getattr(owner, attr)
            if (old.in_features, old.out_features) != (n_in, n_out):
                setattr(owner, attr, empty_linear(n_in, n_out, old))
                changed = True
        dense = counts or cls.config_counts(config)
        block.self_attn.num_key_value_groups = dense["heads"] // dense["kv_heads"]
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = dense["channels"]
        return changed

    @staticmethod
    def first_n(block: nn.Module, counts: dict[str, int]) -> BlockStructure:
        """A structure keeping the first heads and channels of each kind, for giving a block the shapes of a
        saved pruned block before its weights are loaded (which groups are kept is then in the weights)."""
        now = LlamaAdapter.counts(block)
        n_heads, n_kv, kv = now["heads"], now["kv_heads"], counts["kv_heads"]
        per, g = counts["heads"] // kv, n_heads // n_kv
        heads = ([k * g + j for k in range(kv) for j in range(per)] if n_kv == kv and g > 1
                 else list(range(counts["heads"])))
        return BlockStructure(tuple(heads), tuple(range(kv)), tuple(range(counts["channels"])))
