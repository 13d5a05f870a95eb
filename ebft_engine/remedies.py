"""What to change when memory runs short: the lever that makes a plan fit the device, whether an error is the
device running out of memory, and what to change after it did in a given stage. :mod:`.planner` predicts; this
module advises from its predictions."""
from __future__ import annotations

import math
from typing import Any

import torch

from .config import RunConfig
from .device import Precision
from .errors import ConfigError
from .planner import DEVICE_HEADROOM, GiB, MemoryPlan, plan_memory


def suggestion(model_config: Any, config: RunConfig, precision: Precision, capacity: int | None,
               capability: tuple[int, int] | None = None, plan: MemoryPlan | None = None) -> str:
    """What to change so the run fits the device: the first of a few levers that does, with its figure. Given the
    plan that did not fit, a lever must also keep the host within its capacity, planned as that plan was."""
    found = _first_fitting(_device_levers(config), model_config, config, precision, capacity, capability, plan)
    return found or "use a GPU with more memory, a shorter --seqlen, or --device cpu"


def _device_levers(config: RunConfig) -> list[tuple[str, dict[str, Any], str | None]]:
    """(flags, config overrides, activations) that shrink the device peak: a smaller batch, then the host."""
    levers: list[tuple[str, dict[str, Any], str | None]] = [
        (f"--batch-size {b}", {"ebft.batch_size": b}, None) for b in _halves(config.ebft.batch_size)]
    levers.append(("--activations host", {}, "host"))
    for b in (max(config.ebft.batch_size // 2, 1), 1):
        levers.append((f"--activations host --batch-size {b}", {"ebft.batch_size": b}, "host"))
    return levers


def _host_levers(config: RunConfig, plan: MemoryPlan) -> list[tuple[str, dict[str, Any], str | None]]:
    """Levers that shrink the host peak: a smaller batch (on a GPU, auto then keeps the activations on the device;
    on the CPU, autograd's share shrinks), the activations on the device, fewer calibration sequences."""
    batch = config.ebft.batch_size
    levers: list[tuple[str, dict[str, Any], str | None]] = [
        (f"--batch-size {b}", {"ebft.batch_size": b}, None) for b in _halves(batch)]
    if plan.device_type != "cpu" and plan.activations == "host":
        levers += [("--activations device" + (f" --batch-size {b}" if b != batch else ""), {"ebft.batch_size": b},
                    "device") for b in (batch, *_halves(batch))]
    n = config.calib.nsamples
    levers += [(f"--nsamples {n // k}", {"calib.nsamples": n // k}, None) for k in (2, 4) if n // k >= 1]
    return levers


def _halves(b: int) -> list[int]:
    out = []
    while b > 1:
        b //= 2
        out.append(b)
    return out


def _first_fitting(levers, model_config: Any, config: RunConfig, precision: Precision, capacity: int | None,
                   capability: tuple[int, int] | None, plan: MemoryPlan | None) -> str | None:
    """"try FLAGS (planned peaks)" for the first lever whose plan fits the device (within DEVICE_HEADROOM) and,
    when ``plan`` gives a host capacity, the host; None when none does."""
    host = plan.host_capacity if plan is not None else None
    assumed = ({"gguf": plan.gguf, "from_files": plan.from_files, "calib_cached": plan.calib_cached}
               if plan is not None else {})
    for flags, overrides, acts in levers:
        try:
            cfg = config.with_overrides(overrides) if overrides else config
        except ConfigError:  # e.g. fewer sequences than one batch: not a lever for this run
            continue
        trial = plan_memory(model_config, cfg, precision, device_capacity=capacity, host_capacity=host,
                            activations=acts, capability=capability, **assumed)
        if capacity is not None and trial.peak_device > capacity * DEVICE_HEADROOM:
            continue
        if host is not None and trial.peak_host > host:
            continue
        peaks = ([f"device peak {trial.peak_device / GiB:.2f} GiB"] if trial.device_type != "cpu" else []) + (
            [f"host peak {trial.peak_host / GiB:.2f} GiB"] if host is not None else [])
        return f"try {flags} (planned {', '.join(peaks)})"
    return None


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
    """What to change for a plan that does not fit: the device lever that fits (the host too), or for host memory
    how much the run needs and a lever only where one brings it under the host's capacity."""
    if plan.device_capacity is not None and plan.peak_device > plan.device_capacity:
        if max(plan.phases, key=lambda p: p.device).phase == "zeroshot":  # no EBFT lever shrinks it
            return ZEROSHOT_FIX
        return suggestion(model_config, config, precision, plan.device_capacity, plan.capability, plan)
    need = (f"a machine with at least {math.ceil(plan.peak_host / GiB * 100) / 100:.2f} GiB of host memory (this "
            "plan's host peak, rounded up)")
    lever = _first_fitting(_host_levers(config, plan), model_config, config, precision, plan.device_capacity,
                           plan.capability, plan)
    if lever:
        return f"{lever}, or use {need}"
    floor = min(p.host for p in plan.phases)  # the model and the runtime, held by every phase
    return (f"no setting brings it under {plan.host_capacity / GiB:.2f} GiB (the model and the runtime alone "
            f"take {floor / GiB:.2f} GiB): use {need}")
