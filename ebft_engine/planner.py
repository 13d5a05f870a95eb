"""The memory planner: peak device and host memory of each phase, predicted from the model's config and the run
config before any weight is loaded; where the calibration activations live (device or pinned host), and where
the evaluation's hidden states do (:func:`eval_hidden_placement`).

What is counted (bytes; P = model parameters, Pb = one block's, L = blocks, N = calibration tokens, h/f = hidden
and MLP widths, kv = key/value width, T = tokens of one training batch):

- the model, P x storage bytes, on the host (a block at a time visits the device); the dense block copy kept
  to restore between variants, up to 1B, and for a larger model whose blocks cannot be re-read from safetensors
  files (GGUF, .bin only) when the run has more than one variant (else FileBackedBlocks reads the files);
- calibration activations, N x h x storage bytes each: inputs, dense targets (EBFT), outputs: three at once;
- EBFT training state for one block: float32 weights, gradients and two AdamW moments (16 bytes per weight),
  a bool mask (1), the bf16 copies autocast makes of the weights (2), plus what autograd keeps for backward:
  30h + 8f + 4kv bytes per token under bf16 autocast (measured exactly by summing saved tensors of a LLaMA
  block with saved_tensors_hooks, widths 576 to 2048: within 0.1%), doubled without autocast, and the
  backward pass's transient gradients of the widest activations (about 12f + 8h per token);
  before sm80, a grouped-query model's blocks repeat their key/value heads to the query width q
  (models/attention.py): 4q more bytes per token kept for backward, 8q in a no-grad call;
- Hessians: (3h^2 + f^2) float32 per block, times three (sums, scaled copy, factor); more for ALPS (_hessian_bytes);
- structured pruning's importance pass (LLM-Pruner): the whole model on the device and one backward pass over
  taylor_samples x taylor_seqlen tokens with activation checkpointing, each weight's gradient reduced to its
  groups' sums as soon as it exists;
- evaluation: one block, the LM head and a 256-token slice of logits on the device, and the hidden states of all
  windows (windows x seqlen x h x storage bytes) beside them when they fit, else in pinned host memory (rounded up
  to a power of two, as torch's pinned-memory cache allocates) with two batches of inputs on the device (the one
  running and the next, copied ahead);
- on the host, the Python runtime with torch and transformers (RUNTIME_BYTES, measured) and, while a GGUF
  model loads, one transient copy of its weights (the dequantised tensors). A safetensors checkpoint is
  memory-mapped: its pages are reclaimable page cache, not a second copy, so nothing is added for it;
- learned masks (ebft-mask): the block's dense float32 copy, float32 latent weights and a second mask;
- zero-shot scoring (lm-eval, when tasks are set): one batch of 8 requests of up to 1024 tokens (zeroshot.BATCH,
  PLANNED_TOKENS) with its logits over the vocabulary, beside the whole model on the device when both fit
  (:func:`zeroshot_placement`), else beside what lies outside the blocks and one block streamed from the host.
``bench/memory.py`` checks the planner against measurement. Each phase's terms are in ``phase_memory.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import RunConfig
from .device import Precision, capacities, cuda_capability  # noqa: F401  (capacities: callers import it from here)
from .models.attention import repeats_kv
# the terms of each phase (phase_memory.py); the names callers import from here are re-exported
from .phase_memory import (DEVICE_HEADROOM, RUNTIME_BYTES, GiB, PhasePlan, Shape, eval_hidden_placement,  # noqa: F401
                           eval_terms, phases, terms, zeroshot_batch_bytes, zeroshot_mode,
                           zeroshot_placement)


@dataclass(frozen=True)
class MemoryPlan:
    device_type: str
    activations: str  # where calibration activations live: "device" or "host"
    phases: tuple[PhasePlan, ...]
    device_capacity: int | None  # bytes the run may use on the device (None on a CPU run)
    host_capacity: int | None
    capability: tuple[int, int] | None = None  # the CUDA device's compute capability, where known
    eval_hidden: str = "host"  # where the evaluation's hidden states live: "device" or "host"
    zeroshot: str | None = None  # how zero-shot scoring holds the model: "device" or "offload"; None: no tasks
    # what the plan assumed of the model's files and the data (plan_memory's arguments), for a plan of a changed run
    gguf: bool = False
    from_files: bool = True
    calib_cached: bool = False

    @property
    def peak_device(self) -> int:
        return max(p.device for p in self.phases)

    @property
    def peak_host(self) -> int:
        return max(p.host for p in self.phases)

    def phase(self, name: str) -> PhasePlan:
        return next(p for p in self.phases if p.phase == name)

    @property
    def fits(self) -> bool:
        return self.problem is None

    @property
    def problem(self) -> str | None:
        """Why the run cannot fit, or None."""
        if self.device_capacity is not None and self.peak_device > self.device_capacity:
            worst = max(self.phases, key=lambda p: p.device)
            return (f"the {worst.phase} phase needs about {_gib(worst.device)} on the {self.device_type} device, "
                    f"which has {_gib(self.device_capacity)} to give")
        if self.host_capacity is not None and self.peak_host > self.host_capacity:
            worst = max(self.phases, key=lambda p: p.host)
            return (f"the {worst.phase} phase needs about {_gib(worst.host)} of host memory, and "
                    f"{_gib(self.host_capacity)} is available")
        return None

    def summary(self) -> str:
        """One line for the run's log: the peaks and where the activations live."""
        text = f"memory plan: host peak {_gib(self.peak_host)}"
        if self.device_type != "cpu":
            text += (f", device peak {_gib(self.peak_device)}"
                     + (f" of {_gib(self.device_capacity)}" if self.device_capacity else "")
                     + f"; calibration activations on the {self.activations}, evaluation hidden states on the "
                     f"{self.eval_hidden}"
                     + ("; zero-shot with the blocks offloaded to the host" if self.zeroshot == "offload" else ""))
        return text

    def table(self) -> str:
        lines = ["| phase | device | host |", "|---|---:|---:|"]
        for p in self.phases:
            lines.append(f"| {p.phase} | {_gib(p.device) if self.device_type != 'cpu' else '-'} | {_gib(p.host)} |")
        return "\n".join(lines)


def plan_memory(model_config: Any, config: RunConfig, precision: Precision, *, device_capacity: int | None = None,
                host_capacity: int | None = None, calib_cached: bool = False,
                activations: str | None = None, gguf: bool = False, from_files: bool | None = None,
                capability: tuple[int, int] | None = None, eval_hidden: str | None = None) -> MemoryPlan:
    """Predict each phase's peak memory and choose where calibration activations and evaluation states live.

    Args:
        model_config: the model's transformers config (only its shape is read).
        config: the run configuration.
        precision: device and dtypes the run will use.
        device_capacity / host_capacity: bytes available (None: not checked). See :func:`capacities`.
        calib_cached: self-generated calibration is already cached (no generation pass).
        gguf: the model loads from a GGUF file (dequantised on load: a transient copy).
        from_files: the dense blocks can be re-read from safetensors files between variants
            (models.restores_from_files); None: unless ``gguf``. Else a model over 1B keeps a copy in host memory.
        activations: "device", "host", or None to follow ``config.activations`` ("auto": the device when the
            EBFT phase fits there with room to spare, else the host).
        capability: the CUDA card's compute capability (the plan command's ``--gpu``); None reads the run's own
            device. Before sm80 a grouped-query model's blocks repeat their key/value heads
            (models/attention.py), which the activations count.
        eval_hidden: "device", "host", or None for :func:`eval_hidden_placement`'s choice (a CPU run: "host").
    """
    s = Shape.of(model_config)
    from_files = (not gguf) if from_files is None else from_files
    capability = capability or cuda_capability(precision.device)
    repeat = repeats_kv(model_config, capability)
    on_gpu = precision.device.type != "cpu"
    choice = activations or config.activations
    if not on_gpu:
        choice = "host"
    elif choice == "auto":
        trial = phases(terms(s, config, precision, "device", repeat, from_files), calib_cached, gguf, "host",
                        device_capacity)
        fits = device_capacity is None or max(p.device for p in trial) <= device_capacity * DEVICE_HEADROOM
        choice = "device" if fits else "host"
    run = terms(s, config, precision, choice, repeat, from_files)
    where = "host" if not on_gpu else eval_hidden or eval_hidden_placement(*eval_terms(run)[:2], device_capacity)
    return MemoryPlan(device_type=precision.device.type, activations=choice,
                      phases=tuple(phases(run, calib_cached, gguf, where, device_capacity)),
                      device_capacity=device_capacity, host_capacity=host_capacity, capability=capability,
                      eval_hidden=where, gguf=gguf, from_files=from_files, calib_cached=calib_cached,
                      zeroshot=zeroshot_mode(s, precision, device_capacity, repeat) if config.eval.zeroshot else None)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"
