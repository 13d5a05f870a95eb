"""Device and precision policy, decided in one place and passed explicitly."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """Where the work runs and in which dtypes.

    Attributes:
        device: the device one block at a time is moved to.
        storage: dtype the model and the calibration activations are held in.
        compute: dtype of autocast regions (matmuls); None means no autocast.
        needs_scaler: fp16 training needs a gradient scaler; bf16 and fp32 do not.
    """

    device: torch.device
    storage: torch.dtype
    compute: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.compute == torch.float16

    def autocast(self):
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for CUDA without one is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} was asked for but no CUDA GPU is visible",
                          "use --device cpu (or auto)")
    return torch.device(name)


# Models at or under this many parameters are held in float32 by dtype "auto": full precision costs little.
SMALL_MODEL_PARAMS = 1_000_000_000


def pick_precision(device: torch.device, dtype: str, n_params: int) -> Precision:
    """Resolve ``--dtype`` into storage and compute dtypes for this device and model size.

    ``auto`` holds small models in float32 and large ones in bfloat16 (float16 on GPUs without bf16).
    Matmuls run under bf16 autocast wherever the device supports it (on these CPUs bf16 is ~2.5x faster),
    fp16 autocast on older GPUs.
    """
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    half = torch.bfloat16 if bf16_ok else torch.float16
    if dtype == "auto":
        storage = torch.float32 if n_params <= SMALL_MODEL_PARAMS else half
    else:
        storage = getattr(torch, dtype)
    compute = None if (storage == torch.float32 and dtype == "float32") else half
    return Precision(device=device, storage=storage, compute=compute)
