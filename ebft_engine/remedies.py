"""What to change when memory runs short: the lever that makes a plan fit the device, whether an error is the
device running out of memory, and what to change after it did in a given stage. :mod:`.planner` predicts; this
module advises from its predictions."""
from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig
from .device import Precision
from .planner import DEVICE_HEADROOM, GiB, MemoryPlan, plan_memory


def suggestion(model_config: Any, config: RunConfig, precision: Precision, capacity: int | None,
               capability: tuple[int, int] | None = None) -> str:
    """What to change so the run fits the device: the first of a few levers that does, with its figure."""
    levers: list[tuple[str, dict[str, Any], str | None]] = []
    b = config.ebft.batch_size
    while b > 1:
        b //= 2
        levers.append((f"--batch-size {b}", {"ebft.batch_size": b}, None))
    levers.append(("--activations host", {}, "host"))
    for b in (max(config.ebft.batch_size // 2, 1), 1):
        levers.append((f"--activations host --batch-size {b}", {"ebft.batch_size": b}, "host"))
    for flags, overrides, acts in levers:
        cfg = config.with_overrides(overrides) if overrides else config
        plan = plan_memory(model_config, cfg, precision, device_capacity=capacity, activations=acts,
                           capability=capability)
        if capacity is None or plan.peak_device <= capacity * DEVICE_HEADROOM:
            return f"try {flags} (planned device peak {plan.peak_device / GiB:.2f} GiB)"
    return "use a GPU with more memory, a shorter --seqlen, or --device cpu"


# What a device allocation failure looks like besides torch.OutOfMemoryError: cuBLAS / cuSOLVER workspaces and
# older torch builds raise a plain RuntimeError.
OOM_MARKERS = ("out of memory", "ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (of any kind torch reports it as)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MARKERS)


def oom_remedy(stage: str, model_config: Any, config: RunConfig, precision: Precision,
               capacity: int | None) -> tuple[str, bool]:
    """(what to change, whether --resume may take that change) after the device ran out of memory in ``stage``.

    Only EBFT training (``train``) reacts to --batch-size; a block's pruning and propagation pass (``block``)
    to --activations host; evaluation to a shorter window; the importance pass to fewer Taylor tokens; LoRA, which
    holds the whole model, and zero-shot, whose batch remains when its blocks stream, to a larger device.
    """
    if stage == "train":
        if model_config is None:
            return "use a smaller --batch-size or --activations host", True
        return suggestion(model_config, config, precision, capacity), True
    if stage == "block" and config.activations != "host":
        return "try --activations host (calibration activations in pinned host memory)", True
    fixes = {"eval": "use a shorter --eval-seqlen, or --device cpu",
             "importance": "use fewer --taylor-samples or a shorter --taylor-seqlen",
             "lora": "LoRA trains the whole model on the device: use a GPU with more memory, or drop lora from "
                     "--recoveries",
             "zeroshot": ZEROSHOT_FIX}
    return fixes.get(stage, "use a GPU with more memory, a shorter --seqlen, or --device cpu"), False


ZEROSHOT_FIX = ("zero-shot scoring streams the blocks from host memory when the whole model does not fit; what stays "
                "on the device is lm-eval's batch of 8 requests with their logits over the vocabulary and what lies "
                "outside the blocks: use a GPU with more memory, or drop --zeroshot")


def remedy(plan: MemoryPlan, model_config: Any, config: RunConfig, precision: Precision) -> str:
    """What to change for a plan that does not fit: the device lever that fits, or what shrinks host memory."""
    if plan.device_capacity is not None and plan.peak_device > plan.device_capacity:
        if max(plan.phases, key=lambda p: p.device).phase == "zeroshot":  # no EBFT lever shrinks it
            return ZEROSHOT_FIX
        return suggestion(model_config, config, precision, plan.device_capacity, plan.capability)
    return "use fewer --nsamples, a shorter --seqlen or fewer --eval-windows, or a machine with more memory"
