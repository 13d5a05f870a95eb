"""The attention kernel a block runs with, chosen per device.

Blocks run transformers' SDPA attention. For grouped-query attention (fewer key/value heads than query heads:
Llama-3, Mistral, Qwen2/3, SmolLM2) without a padding mask, transformers passes ``enable_gqa=True`` to
``torch.nn.functional.scaled_dot_product_attention``. Only the flash kernel (and cuDNN's) take that flag; the
memory-efficient kernel refuses it, and before compute capability 8.0 (T4, V100, RTX 20xx) there is no flash
kernel, so SDPA silently falls back to the math kernel, which materialises scores of batch x heads x seqlen^2
(Llama-3-8B, batch 8 x 1024 tokens: about 1.5 GiB per batch, and slower). PyTorch's own advice (pytorch/pytorch
issue 139586) is to repeat the key/value heads before SDPA where the GQA kernels are missing: then the
memory-efficient kernel runs, at the cost of the repeated keys and values (2 x tokens x query width x bytes).

``sdpa_repeat_kv`` is that: transformers' ``sdpa_attention_forward`` on key/value heads repeated to the query
heads (transformers' own ``repeat_kv``), registered under :data:`REPEAT_KV` with transformers' SDPA mask
builder, so masks, sliding windows and ``is_causal`` follow transformers exactly. :func:`attention_for` picks it
for GQA models on CUDA devices before sm80 and plain ``"sdpa"`` everywhere else.
"""
from __future__ import annotations

from typing import Any

import torch

from ..device import cuda_capability

REPEAT_KV = "sdpa_repeat_kv"  # the registered name (config._attn_implementation)
FUSED_GQA_CAPABILITY = (8, 0)  # the first compute capability with SDPA's flash kernel, which takes enable_gqa


class _OneGroup:
    """What ``sdpa_attention_forward`` reads of an attention module, once its key/value heads are repeated."""

    num_key_value_groups = 1

    def __init__(self, module: Any):
        self.is_causal = getattr(module, "is_causal", True)


def sdpa_repeat_kv(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with the key/value heads repeated first, so SDPA sees as many key/value heads
    as query heads and never gets ``enable_gqa`` (the signature of transformers' attention functions).

    Args:
        query: (batch, heads, seq, head_dim); key / value: (batch, kv_heads, kv_seq, head_dim).

    Returns:
        ((batch, seq, heads, head_dim) attention output, None).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and query.shape[2] > 1:  # one-token decoding keeps transformers' own packing
        key, value, module = repeat_kv(key, groups), repeat_kv(value, groups), _OneGroup(module)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register :data:`REPEAT_KV` with transformers (attention function and mask builder); idempotent."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(REPEAT_KV, sdpa_repeat_kv)
    AttentionMaskInterface.register(REPEAT_KV, sdpa_mask)


def grouped_query(config: Any) -> bool:
    """Whether ``config`` has fewer key/value heads than query heads."""
    heads = config.num_attention_heads
    return (getattr(config, "num_key_value_heads", None) or heads) < heads


def repeats_kv(config: Any, capability: tuple[int, int] | None) -> bool:
    """Whether blocks repeat their key/value heads: grouped-query attention on a CUDA device whose compute
    ``capability`` (major, minor) is below :data:`FUSED_GQA_CAPABILITY`; ``capability`` None means not CUDA."""
    return capability is not None and tuple(capability) < FUSED_GQA_CAPABILITY and grouped_query(config)


def attention_for(config: Any, device: torch.device) -> str:
    """The attention implementation for a model with ``config`` on ``device``: :data:`REPEAT_KV` (registered on
    the way) where :func:`repeats_kv`, else ``"sdpa"``."""
    if repeats_kv(config, cuda_capability(device)):
        register()
        return REPEAT_KV
    return "sdpa"
