"""Out of device memory: recognising it in whatever form torch raises it, and what to change for the stage of the
run that ran out (:func:`oom_remedy`, the message ``runner.Run.out_of_memory`` gives)."""
from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig
from .device import Precision
from .planner import suggestion


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
    to --activations host; evaluation to a shorter window; the importance pass to fewer Taylor tokens; LoRA and
    zero-shot, which hold the whole model, to a larger device.
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
             "zeroshot": "zero-shot scoring holds the whole model on the device: use a GPU with more memory, or "
                         "drop --zeroshot"}
    return fixes.get(stage, "use a GPU with more memory, a shorter --seqlen, or --device cpu"), False
