"""Structured pruning, LLM-Pruner style (Ma et al. 2023; docs/methods/llm-pruner.md#coupled-groups): whole
attention heads and MLP channels leave a block as coupled groups, and its matrices really get smaller.

Groups, in a LLaMA-family block of ``H`` query heads sharing ``KV`` key/value heads (``g = H / KV`` each):

- an MLP **channel**: one row of gate and of up, one column of down;
- with one query head per key/value head (LLaMA-1/2-7B, g = 1) an attention **head**: its ``head_dim`` rows of
  q, k and v and its columns of o, exactly as in LLM-Pruner;
- with grouped-query attention (g > 1: SmolLM2, Llama-3, Mistral, Qwen2) a **query head**: its rows of q and
  its columns of o. Every key/value group keeps the same number of query heads (the attention kernel shares
  one key/value head among a fixed number of queries), so heads leave in multiples of KV, the least
  important within each group. Key/value heads stay.

Importance is LLM-Pruner's first-order Taylor term (``param_first``): ``|W ⊙ ∂L/∂W|`` per weight, summed over
the group, with the gradient of the dense model's language-model loss over a few calibration sequences
(10 x 64 tokens in the reference), from one backward pass. Each weight's gradient is reduced to its groups'
sums as soon as it is accumulated and then dropped, so no full set of gradients is ever held.

How much goes: ``sparsity`` is the fraction of all blocks' projection weights to remove. The first and last
blocks are left whole (LLM-Pruner: 4 and 2), so each pruned block loses ``sparsity × L / pruned`` of its
weights: its heads at that ratio (rounded to whole heads per group), then as many MLP channels as make up
the rest, so the model comes out at the requested size. Within a block the groups with the lowest
importance go (LLM-Pruner's per-block ranking).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import BlockStructure, adapter_for_block, adapter_for_config
# Shapes and surgery are the model's family adapter's (ebft_engine.models); they are named here too because
# the pipeline reaches structured pruning's whole toolbox through this module.
from ..models import LOADED_COUNTS, config_counts, dense_numel, dense_shapes, loaded_counts  # noqa: F401


@dataclass(frozen=True)
class GroupScores:
    """Taylor importance of one block's groups: per query head, per key/value head, per MLP channel."""

    heads: torch.Tensor  # (H,) from q rows and o columns
    kv_heads: torch.Tensor  # (KV,) from k and v rows
    channels: torch.Tensor  # (F,) from gate and up rows and down columns


def pruned_blocks(n_blocks: int, keep_first: int, keep_last: int) -> list[int]:
    """Indices of the blocks structured pruning touches: all but the first ``keep_first`` and last ``keep_last``."""
    return list(range(keep_first, n_blocks - keep_last))


def block_ratio(sparsity: float, sizes: list[int], pruned: list[int]) -> float:
    """The share of each pruned block's projection weights to remove so that all blocks lose ``sparsity``:
    ``sparsity × L / pruned`` when the blocks are the same size, weighed by ``sizes`` (each block's dense
    projection weights) when they are not (a model loaded structurally pruned)."""
    kept = sum(sizes[i] for i in pruned)
    return sparsity * sum(sizes) / kept if kept else 0.0


FP16_TAYLOR_SCALE = 2.0 ** 16  # the loss scale the fp16 importance pass starts from (GradScaler's default)


def taylor_importance(model: nn.Module, blocks: nn.ModuleList, indices: list[int], ids: torch.Tensor,
                      precision) -> dict[int, GroupScores]:
    """LLM-Pruner's first-order importance of the groups of blocks ``indices``, from one backward pass of the
    language-model loss over ``ids`` (n, seq) through ``model`` (on ``precision.device`` for the call)."""
    family = adapter_for_config(model.config)
    sums: dict[int, dict[str, torch.Tensor]] = {i: {} for i in indices}
    hooks, params = [], []
    # float16 (GPUs without native bf16): the loss is scaled so small gradients survive in float16, halved while
    # they overflow; each group sum is unscaled as it is reduced.
    scale = [FP16_TAYLOR_SCALE if precision.needs_scaler else 1.0]
    for i in indices:
        block = blocks[i]
        hd = family.head_dim(block)
        for name, module in family.linears(block).items():
            p = module.weight
            p.requires_grad_(True)
            params.append(p)
            hooks.append(p.register_post_accumulate_grad_hook(_reducer(family, sums[i], name, hd, scale)))
    was_training = model.training
    try:
        model.to(precision.device)
        # Activation checkpointing: backward recomputes each block from its input, so only the blocks' inputs
        # and one block's internals are held (LLaMA-7B: about 0.3 GiB instead of 4.7 for 10 x 64 tokens).
        # transformers checkpoints in training mode only; LLaMA-family blocks have no dropout to switch on.
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        _scaled_backward(model, ids.to(precision.device), precision, sums, scale)
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.to("cpu")
        model.train(was_training)
    return {i: GroupScores(**{kind: _group_sum(family, s, kind) for kind in ("heads", "kv_heads", "channels")})
            for i, s in sums.items()}


def _reducer(family, sums: dict[str, torch.Tensor], name: str, hd: int, scale: list[float]):
    """A hook reducing projection ``name``'s weight gradient, as soon as it is accumulated, to its groups' sums
    of ``|W * dL/dW|`` (into ``sums[name]``), then dropping the gradient."""
    kind, axis = family.group_axes[name]  # a group's weights lie along rows (0) or columns (1)

    def hook(p: nn.Parameter) -> None:
        t = (p.detach().float() * p.grad.float()).abs() / scale[0]
        p.grad = None  # reduced: the gradient is not needed any more
        per = t.sum(1 - axis)  # one sum per output row (axis 0) or input column (axis 1)
        sums[name] = (per if kind == "channels" else per.view(-1, hd).sum(1)).cpu()  # a head is hd wide
    return hook


def _scaled_backward(model: nn.Module, batch: torch.Tensor, precision, sums: dict[int, dict[str, torch.Tensor]],
                     scale: list[float]) -> None:
    """One backward pass of the language-model loss, times ``scale[0]``; again at half the scale while a reduced
    sum overflowed (float16), down to a scale of 1."""
    while True:
        with precision.autocast():
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the dense model's loss on the importance samples is {float(loss)}")
        (loss * scale[0]).backward()
        finite = all(bool(torch.isfinite(t).all()) for s in sums.values() for t in s.values())
        if finite or scale[0] <= 1.0:
            return
        scale[0] /= 2  # a scaled gradient overflowed float16: again, at half the scale


def _group_sum(family, sums: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The importance of each group of ``kind``: its projections' sums added in the family's order (for LLaMA:
    q + o, k + v, gate + up + down)."""
    names = [name for name in family.linear_names if family.group_axes[name][0] == kind]
    total = sums[names[0]]
    for name in names[1:]:
        total = total + sums[name]
    return total


def choose(block: nn.Module, scores: GroupScores, ratio: float) -> BlockStructure:
    """The groups block keeps when ``ratio`` of its projection weights are to go (see the module docstring)."""
    family = adapter_for_block(block)
    now, size = family.counts(block), family.group_numel(block)
    n_heads, n_kv, n_channels = now["heads"], now["kv_heads"], now["channels"]
    g = n_heads // n_kv
    total = sum(m.weight.numel() for m in family.linears(block).values())
    if g == 1:  # a head is q, k, v rows and o columns together
        drop = min(round(ratio * n_heads), n_heads - 1)
        score = scores.heads + scores.kv_heads
        keep = sorted(torch.argsort(score, descending=True)[:n_heads - drop].tolist())
        heads, kv_heads = keep, keep
        removed = drop * (size["heads"] + size["kv_heads"])
    else:  # the same number of query heads leaves every key/value group
        per_group = min(round(ratio * g), g - 1)
        heads = []
        for k in range(n_kv):
            group = scores.heads[k * g:(k + 1) * g]
            heads += [k * g + j for j in sorted(torch.argsort(group, descending=True)[:g - per_group].tolist())]
        kv_heads = list(range(n_kv))
        removed = per_group * n_kv * size["heads"]
    per_channel = size["channels"]
    drop_channels = int(min(max(round((ratio * total - removed) / per_channel), 0), n_channels - 1))
    channels = sorted(torch.argsort(scores.channels, descending=True)[:n_channels - drop_channels].tolist())
    return BlockStructure(tuple(heads), tuple(kv_heads), tuple(channels))


# --- a block's shape and surgery, by its family's adapter ---

def counts(block: nn.Module) -> dict[str, int]:
    """A block's heads, key/value heads and MLP channels as its shapes say."""
    return adapter_for_block(block).counts(block)


def shrink(block: nn.Module, structure: BlockStructure) -> None:
    """Make ``block`` keep only ``structure``'s heads and channels, in place (smaller Linear modules)."""
    adapter_for_block(block).shrink(block, structure)


def first_n(block: nn.Module, counts: dict[str, int]) -> BlockStructure:
    """A structure keeping the first heads and channels of each kind (the shapes of a saved pruned block)."""
    return adapter_for_block(block).first_n(block, counts)


def regrow(block: nn.Module, config, counts: dict[str, int] | None = None) -> bool:
    """Give a shrunk block its dense shapes back (the config's, or ``counts``'); return whether anything changed."""
    return adapter_for_config(config).regrow(block, config, counts)
