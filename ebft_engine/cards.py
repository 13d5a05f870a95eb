""""Will it fit?" without a GPU: the memory plan of a run on a named card (or any capacity), before any weight is
read — ``python -m ebft_engine plan --config PRESET --gpu t4``.

A card brings its memory and its compute capability; the capability decides the precision (bf16 from sm80,
:func:`device.bf16_native`) and which attention kernel PyTorch's SDPA can use, the planner does the rest from
the model's config alone. Memory is the total nvidia-smi reports for the card.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .device import BF16_MIN_CAPABILITY, pick_precision
from .errors import ConfigError
from .models import check_architecture, count_params, load_config, resolve_source, restores_from_files
from .planner import DEVICE_HEADROOM, GiB, plan_memory
from .remedies import remedy

MiB = 1024 ** 2


@dataclass(frozen=True)
class Card:
    name: str
    memory: int  # bytes
    capability: tuple[int, int]  # CUDA compute capability
    assumed: bool = False  # --gpu-memory alone: the capability is not known, sm80 is taken

    @property
    def bf16(self) -> bool:
        return self.capability >= BF16_MIN_CAPABILITY


CARDS = {
    "t4": Card("NVIDIA T4 16 GB", 15360 * MiB, (7, 5)),
    "v100-16": Card("Tesla V100 16 GB", 16160 * MiB, (7, 0)),
    "rtx4080-16": Card("GeForce RTX 4080 16 GB", 16376 * MiB, (8, 9)),
    "a100-40": Card("A100 40 GB", 40960 * MiB, (8, 0)),
    "h100-80": Card("H100 80 GB", 81559 * MiB, (9, 0)),
}


def gib(flag: str, value: str | float | None, example: str) -> float | None:
    """``--gpu-memory`` / ``--host-memory`` as a positive, finite number of GiB (None when not given); ConfigError
    naming the flag otherwise (text that is not a number, 0, a negative, nan, inf)."""
    if value is None:
        return None
    try:
        amount = float(value)
    except ValueError:
        amount = float("nan")
    if not 0 < amount < float("inf"):
        raise ConfigError(flag, f"{str(value).strip()!r} is not an amount of memory",
                          f"give a positive number of GiB, e.g. {flag} {example}")
    return amount


def card_named(gpu: str | None, gpu_memory: str | float | None) -> Card:
    """The card for ``--gpu NAME`` (any case), ``--gpu-memory GiB`` (an sm80+ card of that size, its capability
    assumed), or both (the named card's kind with that memory); ConfigError otherwise."""
    gpu_memory = gib("--gpu-memory", gpu_memory, "24")
    if gpu is None and gpu_memory is None:
        raise ConfigError("--gpu", "no card given", f"name one with --gpu ({', '.join(CARDS)}), or give any "
                          "other card's memory with --gpu-memory GiB")
    key = None if gpu is None else gpu.strip().lower()
    if key is not None and key not in CARDS:
        raise ConfigError("--gpu", f"{gpu!r} is not a card this planner knows", f"use one of {', '.join(CARDS)}; "
                          "for any other card give its memory with --gpu-memory GiB, and --gpu t4 or v100-16 as "
                          "its kind if it is older than compute capability 8.0")
    if gpu_memory is None:
        return CARDS[key]
    if key is None:
        return Card(f"a {gpu_memory:g} GiB card", int(gpu_memory * GiB), BF16_MIN_CAPABILITY, assumed=True)
    return Card(f"a {gpu_memory:g} GiB card ({key})", int(gpu_memory * GiB), CARDS[key].capability)


def attention_kernel(model_config, card: Card) -> str:
    """Which SDPA kernel a block's attention gets on ``card``, as transformers calls it (no padding mask)."""
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    windowed = getattr(model_config, "sliding_window", None) is not None
    if card.capability >= BF16_MIN_CAPABILITY:
        return ("memory-efficient (the sliding-window mask rules out flash)" if windowed
                else "flash attention")
    if kv != heads:
        return ("memory-efficient, on key/value heads repeated to the query heads (before sm80 there is no flash "
                "kernel, and the memory-efficient one cannot take grouped-query attention: models/attention.py)")
    return "memory-efficient (no flash attention before sm80)"


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "model-configs"


def model_shape(source) -> tuple[Any, str | None]:
    """(the model's config, the shipped file it came from or None): for a hub id the presets use, the copy shipped
    in assets/model-configs/ORG--NAME.json (those public shapes do not change, and a plan then needs no network:
    the plan command and the lab's Memory plan); else the model's own config, read without its weights."""
    shipped = SHIPPED_CONFIGS / (source.path.replace("/", "--") + ".json")
    if source.gguf_file or Path(source.path).exists() or not shipped.is_file():
        return load_config(source), None
    from transformers import AutoConfig

    data = json.loads(shipped.read_text(encoding="utf-8"))
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    check_architecture(config)
    return config, str(shipped.relative_to(SHIPPED_CONFIGS.parents[1]))


ZEROSHOT_MODES = {"device": "the whole model on the device",
                  "offload": "blocks offloaded to host memory, streamed to the device as they run (the model and "
                             "lm-eval's batch would not fit; slower: every batch copies every block over)"}


def plan_text(config: RunConfig, card: Card, host_memory: str | float | None = None) -> tuple[str, bool]:
    """(the plan as text, whether it fits) for ``config`` on ``card`` (and ``host_memory`` GiB of RAM, when
    given); reads the model's config only."""
    host_memory = gib("--host-memory", host_memory, "32")
    if config.eval.zeroshot:  # as a run refuses it, by name (lm-eval's task index; no data is read)
        from .zeroshot import check_task_names

        check_task_names(config.eval.zeroshot, config.eval.zeroshot_include)
    source = resolve_source(config.model)
    model_config, shipped = model_shape(source)
    n_params = count_params(model_config)
    precision = pick_precision(torch.device("cuda"), config.dtype, n_params, native_bf16=card.bf16)
    storage, compute = precision.storage, precision.compute
    capacity = card.memory
    host = None if host_memory is None else int(host_memory * GiB)
    plan = plan_memory(model_config, config, precision, device_capacity=capacity, host_capacity=host,
                       gguf=source.gguf_file is not None, from_files=restores_from_files(source),
                       capability=card.capability)
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    lines = [f"model: {config.model} ({n_params / 1e9:.2f}B parameters, {model_config.num_hidden_layers} blocks"
             f"{f'; its shape from {shipped}' if shipped else ''})",
             f"card: {card.name}, {capacity / GiB:.2f} GiB, compute capability {card.capability[0]}."
             f"{card.capability[1]}" + (" assumed (8.0 or newer: bf16 and flash attention; for an older card add "
                                        "--gpu with a card of its kind, t4 or v100-16)" if card.assumed else ""),
             f"precision: weights {name(storage)}, compute {name(compute) if compute else 'float32'}"
             + ("" if card.bf16 or compute is None else " with a gradient scaler (no native bf16 before sm80)"),
             f"attention kernel: {attention_kernel(model_config, card)}",
             f"calibration activations: on the {plan.activations}",
             f"evaluation hidden states: on the {plan.eval_hidden}"]
    if plan.zeroshot:
        lines.append("zero-shot (lm-eval): " + ZEROSHOT_MODES[plan.zeroshot])
    lines += ["", "| phase | device | host |", "|---|---:|---:|"]
    lines += [f"| {p.phase} | {p.device / GiB:.2f} GiB | {p.host / GiB:.2f} GiB |" for p in plan.phases]
    lines.append("")
    if plan.fits:
        lines.append(f"verdict: fits (device peak {plan.peak_device / GiB:.2f} GiB of {capacity / GiB:.2f}, "
                     f"{plan.peak_device / capacity:.0%}; host peak {plan.peak_host / GiB:.2f} GiB)")
    else:
        lines.append(f"verdict: does not fit: {plan.problem}; {remedy(plan, model_config, config, precision)}")
    if plan.fits and plan.peak_device > capacity * DEVICE_HEADROOM:
        lines.append(f"note: above {DEVICE_HEADROOM:.0%} of the card, where allocator fragmentation may bite")
    return "\n".join(lines), plan.fits
