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
from typing import Any

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


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of an attention module as it is now."""
    hd = attn.head_dim
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd


FP16_TAYLOR_SCALE = 2.0 ** 16  # the loss scale the fp16 importance pass starts from (GradScaler's default)


def taylor_importance(model: nn.Module, blocks: nn.ModuleList, indices: list[int], ids: torch.Tensor,
                      precision) -> dict[int, GroupScores]:
    """LLM-Pruner's first-order importance of the groups of blocks ``indices``, from one backward pass of the
    language-model loss over ``ids`` (n, seq) through ``model`` (on ``precision.device`` for the call)."""
    sums: dict[int, dict[str, torch.Tensor]] = {i: {} for i in indices}
    hooks, params = [], []
    # float16 (GPUs without native bf16): the loss is scaled so small gradients survive in float16, halved while
    # they overflow; each group sum is unscaled as it is reduced.
    scale = [FP16_TAYLOR_SCALE if precision.needs_scaler else 1.0]

    def reducer(i: int, name: str, hd: int):
        def hook(p: nn.Parameter) -> None:
            t = (p.detach().float() * p.grad.float()).abs() / scale[0]
            p.grad = None  # reduced: the gradient is not needed any more
            if name in ("q_proj", "k_proj", "v_proj"):
                sums[i][name] = t.sum(1).view(-1, hd).sum(1).cpu()
            elif name == "o_proj":
                sums[i][name] = t.sum(0).view(-1, hd).sum(1).cpu()
            elif name in ("gate_proj", "up_proj"):
                sums[i][name] = t.sum(1).cpu()
            else:  # down_proj: one column per channel
                sums[i][name] = t.sum(0).cpu()
        return hook

    from ..models import LlamaAdapter

    for i in indices:
        block = blocks[i]
        hd = block.self_attn.head_dim
        for name, module in LlamaAdapter.linears(block).items():
            p = module.weight
            p.requires_grad_(True)
            params.append(p)
            hooks.append(p.register_post_accumulate_grad_hook(reducer(i, name, hd)))
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
        batch = ids.to(precision.device)
        while True:
            with precision.autocast():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the dense model's loss on the importance samples is {float(loss)}")
            (loss * scale[0]).backward()
            finite = all(bool(torch.isfinite(t).all()) for s in sums.values() for t in s.values())
            if finite or scale[0] <= 1.0:
                break
            scale[0] /= 2  # a scaled gradient overflowed float16: again, at half the scale
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.to("cpu")
        model.train(was_training)
    return {i: GroupScores(heads=s["q_proj"] + s["o_proj"], kv_heads=s["k_proj"] + s["v_proj"],
                           channels=s["gate_proj"] + s["up_proj"] + s["down_proj"]) for i, s in sums.items()}


def choose(block: nn.Module, scores: GroupScores, ratio: float) -> BlockStructure:
    """The groups block keeps when ``ratio`` of its projection weights are to go (see the module docstring)."""
    attn, mlp = block.self_attn, block.mlp
    n_heads, n_kv, hd = _heads(attn)
    g = n_heads // n_kv
    hidden = attn.q_proj.in_features
    n_channels = mlp.gate_proj.out_features
    total = sum(m.weight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                            mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if g == 1:  # a head is q, k, v rows and o columns together
        drop = min(round(ratio * n_heads), n_heads - 1)
        score = scores.heads + scores.kv_heads
        keep = sorted(torch.argsort(score, descending=True)[:n_heads - drop].tolist())
        heads, kv_heads = keep, keep
        removed = drop * 4 * hd * hidden
    else:  # the same number of query heads leaves every key/value group
        per_group = min(round(ratio * g), g - 1)
        heads = []
        for k in range(n_kv):
            group = scores.heads[k * g:(k + 1) * g]
            heads += [k * g + j for j in sorted(torch.argsort(group, descending=True)[:g - per_group].tolist())]
        kv_heads = list(range(n_kv))
        removed = per_group * n_kv * 2 * hd * hidden
    per_channel = 3 * hidden
    drop_channels = int(min(max(round((ratio * total - removed) / per_channel), 0), n_channels - 1))
    channels = sorted(torch.argsort(scores.channels, descending=True)[:n_channels - drop_channels].tolist())
    return BlockStructure(tuple(heads), tuple(kv_heads), tuple(channels))


def _rows(hd: int, heads) -> torch.Tensor:
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
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


def shrink(block: nn.Module, structure: BlockStructure) -> None:
    """Make ``block`` keep only ``structure``'s heads and channels, in place (its Linear modules are replaced by
    smaller ones). The block still computes with the same code: the head count follows from the shapes."""
    attn, mlp = block.self_attn, block.mlp
    _, _, hd = _heads(attn)
    q, kv = _rows(hd, structure.heads), _rows(hd, structure.kv_heads)
    attn.q_proj, attn.o_proj = _sliced(attn.q_proj, rows=q), _sliced(attn.o_proj, cols=q)
    attn.k_proj, attn.v_proj = _sliced(attn.k_proj, rows=kv), _sliced(attn.v_proj, rows=kv)
    attn.num_key_value_groups = len(structure.heads) // len(structure.kv_heads)
    ch = torch.as_tensor(list(structure.channels), dtype=torch.long)
    mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=ch), _sliced(mlp.up_proj, rows=ch)
    mlp.down_proj = _sliced(mlp.down_proj, cols=ch)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(structure.channels)


def dense_shapes(config, counts: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a block before any pruning: from the model's config,
    or with ``counts`` (heads, kv_heads, channels) for a block that was loaded already smaller (see
    :func:`loaded_counts`)."""
    from ..models import projection_shapes

    return projection_shapes(config, counts)


def dense_numel(config, counts: dict[str, int] | None = None) -> dict[str, int]:
    """The weights each projection of a block has before any pruning (``counts``: see :func:`dense_shapes`)."""
    return {name: n_in * n_out for name, (n_in, n_out) in dense_shapes(config, counts).items()}


def config_counts(config) -> dict[str, int]:
    """The heads, key/value heads and MLP channels the config gives every block."""
    heads = config.num_attention_heads
    return {"heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "channels": config.intermediate_size}


LOADED_COUNTS = "ebft_loaded_counts"  # attribute of a model loaded structurally pruned: its blocks' counts


def loaded_counts(model: nn.Module) -> list[dict[str, int] | None]:
    """Each block's counts as the model was loaded (a structurally pruned model saved by EBFT Lab is the dense
    model of the runs on it); None for a block of the config's sizes."""
    counts = getattr(model, LOADED_COUNTS, None)
    return list(counts) if counts else [None] * len(model.model.layers)


def counts(block: nn.Module) -> dict[str, int]:
    """A block's heads, key/value heads and MLP channels as its shapes say."""
    n_heads, n_kv, _ = _heads(block.self_attn)
    return {"heads": n_heads, "kv_heads": n_kv, "channels": block.mlp.gate_proj.out_features}


def first_n(block: nn.Module, counts: dict[str, int]) -> BlockStructure:
    """A structure keeping the first heads and channels of each kind, for giving a block the shapes of a saved
    pruned block before its weights are loaded (which groups are kept is then in the weights themselves)."""
    n_heads, n_kv, _ = _heads(block.self_attn)
    kv = counts["kv_heads"]
    per = counts["heads"] // kv
    g = n_heads // n_kv
    heads = [k * g + j for k in range(kv) for j in range(per)] if n_kv == kv and g > 1 else list(range(counts["heads"]))
    return BlockStructure(tuple(heads), tuple(range(kv)), tuple(range(counts["channels"])))


def regrow(block: nn.Module, config, counts: dict[str, int] | None = None) -> bool:
    """Give a shrunk block its dense shapes back (new Linear modules, contents to be restored by the caller):
    the config's, or ``counts``' for a block that was loaded smaller; return whether anything changed."""
    from ..models import LINEAR_PATHS

    attn, mlp = block.self_attn, block.mlp
    changed = False
    for name, (n_in, n_out) in dense_shapes(config, counts).items():
        owner_path, attr = LINEAR_PATHS[name].rsplit(".", 1)
        owner = block.get_submodule(owner_path)
        old = getattr(owner, attr)
        if (old.in_features, old.out_features) != (n_in, n_out):
            new = torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=old.bias is not None,
                                           device=old.weight.device, dtype=old.weight.dtype).requires_grad_(False)
            setattr(owner, attr, new)
            changed = True
    dense = counts or config_counts(config)
    attn.num_key_value_groups = dense["heads"] // dense["kv_heads"]
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = dense["channels"]
    return changed
