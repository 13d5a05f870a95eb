"""Device and precision policy, decided in one place and passed explicitly."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import ConfigError, EbftError


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


# bf16 tensor cores arrived with compute capability 8.0 (Ampere: A100, RTX 30xx). torch.cuda.is_bf16_supported()
# also answers True where bf16 is only emulated (T4 sm75, V100 sm70, RTX 20xx): 3-8x slower and without the
# fused attention kernels, so it is not the test.
BF16_MIN_CAPABILITY = (8, 0)


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability (major, minor) of ``device`` when it is a CUDA device present here, else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: the CPU (autocast is fast on these machines) and CUDA
    devices of compute capability 8.0 or more, judged per device index (a machine may mix cards)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY
    return False


def pick_precision(device: torch.device, dtype: str, n_params: int, native_bf16: bool | None = None) -> Precision:
    """Resolve ``--dtype`` into storage and compute dtypes for this device and model size.

    ``auto`` holds small models in float32 and large ones in bfloat16 (float16 on GPUs without native bf16,
    see :func:`bf16_native`). Matmuls run under bf16 autocast wherever the device runs it natively (on these
    CPUs bf16 is ~2.5x faster), fp16 autocast with a gradient scaler on older GPUs (T4, V100, RTX 20xx).
    ``native_bf16`` answers for a card that is not here (the plan command's ``--gpu``).
    """
    half = torch.bfloat16 if (bf16_native(device) if native_bf16 is None else native_bf16) else torch.float16
    if dtype == "auto":
        storage = torch.float32 if n_params <= SMALL_MODEL_PARAMS else half
    else:
        storage = getattr(torch, dtype)
    compute = None if (storage == torch.float32 and dtype == "float32") else half
    return Precision(device=device, storage=storage, compute=compute)


FLOAT16_MAX = 65504.0  # the largest finite float16: activations beyond it become inf, then NaN


def non_finite(precision: Precision, what: str) -> EbftError:
    """The error for a perplexity or hidden state that is not finite, naming the likely cause.

    With float16 weights or compute the cause is float16's range (activations past 65504 become inf): the run
    is a configuration the model cannot run in, a ConfigError on ``dtype`` offering only dtypes this device
    has. Without float16 no overflow is to be expected, and the number is refused all the same.
    """
    p = precision
    dtypes = f"weights {str(p.storage).replace('torch.', '')}" + (
        "" if p.compute is None else f", compute {str(p.compute).replace('torch.', '')}")
    if torch.float16 in (p.storage, p.compute):
        fix = ("use --dtype bfloat16 (float32's range) or --dtype float32" if bf16_native(p.device)
               else "use --dtype float32 (this GPU has no native bfloat16)")
        return ConfigError("dtype", f"{what} is not finite: the model's activations leave float16's range "
                           f"(largest value {FLOAT16_MAX:g}) with {dtypes}", fix)
    return EbftError(f"{what} is not finite with {dtypes} (no float16 overflow): the model's weights or the "
                     "pruned weights hold inf or NaN; check the model's files")


def check_finite(t: torch.Tensor, precision: Precision, what: str) -> None:
    """Raise :func:`non_finite` when ``t`` holds inf or NaN."""
    if not bool(torch.isfinite(t).all()):
        raise non_finite(precision, what)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised host memory for activations that visit ``device`` a batch at a time.

    Page-locked (pinned) when ``device`` is CUDA, so that host-to-device and device-to-host copies can be
    non-blocking and overlap the device's work; plain memory otherwise (on a CPU run there is nothing to copy,
    and pinning needs an accelerator). Allocate once and reuse it: pinning is a costly system call.
    """
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def release_pinned_cache(device: torch.device) -> None:
    """Hand the pinned host memory that no tensor uses any more back to the system, on CUDA (elsewhere nothing is
    pinned). torch's caching host allocator keeps every pinned block, its size rounded up to a power of two, for
    reuse until it is told otherwise: a phase's pinned buffer would otherwise stay resident through the next."""
    if device.type != "cuda":
        return
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)  # newer torch
    empty = empty or getattr(torch._C, "_host_emptyCache", None)  # CUDA builds since torch 2.5
    if empty is not None:
        empty()


def capacities(device: torch.device) -> tuple[int | None, int | None]:
    """(device bytes this process may use, host bytes available) right now; None where unknown."""
    host = _meminfo("MemAvailable")
    if host is not None:
        host += _rss()  # what this process already holds counts as available to it
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        usable = min(free + torch.cuda.memory_reserved(index), total)
        try:  # a cap set with torch.cuda.set_per_process_memory_fraction (e.g. to act as a 16 GB card)
            usable = min(usable, total * torch.cuda.get_per_process_memory_fraction(index))
        except (AttributeError, RuntimeError):
            pass
        return int(usable), host
    return None, host


def _meminfo(key: str) -> int | None:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
