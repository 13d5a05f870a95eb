"""The memory planner: peak device and host memory of each phase, predicted from the model's config and the run
config before any weight is loaded; and where the calibration activations live (device or pinned host).

What is counted (bytes; P = model parameters, Pb = one block's, L = blocks, N = calibration tokens, h/f = hidden
and MLP widths, kv = key/value width, T = tokens of one training batch):

- the model itself, P x storage bytes, on the host (one block at a time visits the device);
- the dense copy of the block weights kept to restore between variants, for models up to 1B (larger ones
  restore from their own memory-mapped safetensors files, models.FileBackedBlocks);
- calibration activations, N x h x storage bytes each: the inputs, the dense targets (EBFT) and the outputs
  being propagated, three at once in an EBFT block;
- EBFT training state for one block: float32 weights, gradients and two AdamW moments (16 bytes per weight),
  a bool mask (1), the bf16 copies autocast makes of the weights (2), plus what autograd keeps for backward:
  30h + 8f + 4kv bytes per token under bf16 autocast (measured exactly by summing saved tensors of a LLaMA
  block with saved_tensors_hooks, widths 576 to 2048: within 0.1%), doubled without autocast, and the
  backward pass's transient gradients of the widest activations (about 12f + 8h per token);
- SparseGPT's Hessians: (3h^2 + f^2) float32 per block, times three while the inverse is factorised;
- structured pruning's importance pass (LLM-Pruner): the whole model on the device and one backward pass over
  taylor_samples x taylor_seqlen tokens with activation checkpointing, each weight's gradient reduced to its
  groups' sums as soon as it exists;
- evaluation: one block, the LM head and a 256-token slice of logits on the device; all windows' hidden
  states on the host;
- on the host, the Python runtime with torch and transformers (RUNTIME_BYTES, measured) and, while a GGUF
  model loads, one transient copy of its weights (the dequantised tensors). A safetensors checkpoint is
  memory-mapped: its pages are reclaimable page cache, not a second copy, so nothing is added for it.

The planner is checked against measurement by ``bench/memory.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import RunConfig
from .device import Precision
from .evaluate import EVAL_BATCH, HEAD_CHUNK, INFER_BATCH
from .models import CACHE_MAX_PARAMS, block_params, count_params, projection_shapes

GiB = 1024 ** 3
RUNTIME_BYTES = 480 * 1024 ** 2  # python + torch + transformers + datasets, resident (bench/memory.py measures it)
DEVICE_HEADROOM = 0.92  # plan to use at most this share of the device (allocator fragmentation, CUDA context)


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a model config."""

    hidden: int
    intermediate: int
    kv: int
    layers: int
    vocab: int
    tied: bool
    block_params: int  # one block's weights (models.block_params: q and o follow head_dim, not hidden)
    params: int  # the whole model's (models.count_params)

    @classmethod
    def of(cls, config: Any) -> Shape:
        """Widths from the model family's projection shapes (models.shapes: the one home of that arithmetic)."""
        shapes = projection_shapes(config)
        return cls(hidden=shapes["k_proj"][0], intermediate=shapes["gate_proj"][1], kv=shapes["k_proj"][1],
                   layers=config.num_hidden_layers, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)), block_params=block_params(config),
                   params=count_params(config))


@dataclass(frozen=True)
class PhasePlan:
    phase: str
    device: int  # peak bytes on the accelerator (0 on a CPU run: everything is host memory)
    host: int  # peak resident bytes of the process
    parts: dict[str, int] = field(default_factory=dict)  # the largest terms, for the explanation


@dataclass(frozen=True)
class MemoryPlan:
    device_type: str
    activations: str  # where calibration activations live: "device" or "host"
    phases: tuple[PhasePlan, ...]
    device_capacity: int | None  # bytes the run may use on the device (None on a CPU run)
    host_capacity: int | None

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
                     + f"; calibration activations on the {self.activations}")
        return text

    def table(self) -> str:
        lines = ["| phase | device | host |", "|---|---:|---:|"]
        for p in self.phases:
            lines.append(f"| {p.phase} | {_gib(p.device) if self.device_type != 'cpu' else '-'} | {_gib(p.host)} |")
        return "\n".join(lines)


def plan_memory(model_config: Any, config: RunConfig, precision: Precision, *, device_capacity: int | None = None,
                host_capacity: int | None = None, calib_cached: bool = False,
                activations: str | None = None, gguf: bool = False) -> MemoryPlan:
    """Predict each phase's peak memory and choose where calibration activations live.

    Args:
        model_config: the model's transformers config (only its shape is read).
        config: the run configuration.
        precision: device and dtypes the run will use.
        device_capacity / host_capacity: bytes available (None: not checked). See :func:`capacities`.
        calib_cached: self-generated calibration is already cached (no generation pass).
        gguf: the model loads from a GGUF file (dequantised on load: a transient copy).
        activations: "device", "host", or None to follow ``config.activations`` ("auto": the device when the
            EBFT phase fits there with room to spare, else the host).
    """
    s = Shape.of(model_config)
    on_gpu = precision.device.type != "cpu"
    choice = activations or config.activations
    if not on_gpu:
        choice = "host"
    elif choice == "auto":
        trial = _phases(s, config, precision, "device", calib_cached, gguf)
        fits = device_capacity is None or max(p.device for p in trial) <= device_capacity * DEVICE_HEADROOM
        choice = "device" if fits else "host"
    phases = _phases(s, config, precision, choice, calib_cached, gguf)
    return MemoryPlan(device_type=precision.device.type, activations=choice, phases=tuple(phases),
                      device_capacity=device_capacity, host_capacity=host_capacity)


def _phases(s: Shape, cfg: RunConfig, p: Precision, acts: str, calib_cached: bool, gguf: bool) -> list[PhasePlan]:
    sb = p.storage.itemsize
    h, f, kv, pb = s.hidden, s.intermediate, s.kv, s.block_params
    on_gpu = p.device.type != "cpu"
    model = s.params * sb
    snapshot = s.layers * pb * sb if s.params <= CACHE_MAX_PARAMS else 0
    act = cfg.calib.total * cfg.calib.seqlen * h * sb
    base = RUNTIME_BYTES + model + snapshot
    autocast = 1 if p.compute is not None else 2

    def inference(tokens: int) -> int:  # transient of one no-grad block call: q,k,v,attention out, MLP hiddens
        return tokens * (4 * (4 * h + 2 * kv) + 4 * 3 * f)

    phases = []
    load_transient = model if gguf else 0
    phases.append(PhasePlan("load", 0, RUNTIME_BYTES + model + load_transient, {"model": model}))

    gen = 0
    generated = cfg.calib.nsamples if cfg.calib.source == "self" else cfg.calib.self_nsamples
    if generated and not calib_cached:
        # generation runs a bfloat16 copy of the model with a KV cache over all sequences of a batch
        copy = s.params * 2
        kv_cache = min(generated, 32) * cfg.calib.seqlen * s.layers * 2 * kv * 2
        gen = copy + kv_cache + min(generated, 32) * s.vocab * 4 * 2
    phases.append(PhasePlan("data", gen if on_gpu else 0, base + (0 if on_gpu else gen), {"generation": gen}))

    eval_seqlen = cfg.eval.seqlen or 2048
    eval_hidden = _eval_windows(cfg, eval_seqlen) * eval_seqlen * h * sb
    eval_dev = pb * sb + s.vocab * h * sb + inference(EVAL_BATCH * eval_seqlen) + HEAD_CHUNK * s.vocab * 4 * 3
    phases.append(PhasePlan("eval", eval_dev if on_gpu else 0,
                            base + eval_hidden + (0 if on_gpu else inference(EVAL_BATCH * eval_seqlen)),
                            {"hidden states": eval_hidden}))

    if cfg.prune.structured:
        # LLM-Pruner's importance pass: the whole model on the device, one backward of the language-model loss
        # over a few short sequences; each weight's gradient is reduced to its group sums and dropped at once
        tokens = cfg.prune.taylor_samples * cfg.prune.taylor_seqlen
        # activation checkpointing: every block's input, and one block's saved tensors while it is recomputed
        saved = tokens * h * sb * s.layers + autocast * tokens * (30 * h + 8 * f + 4 * kv)
        logits = tokens * s.vocab * (2 + 4 + 4)
        grads = 3 * h * f * 4  # the widest weight's gradient and its float32 product with the weight
        taylor = saved + logits + grads + tokens * (12 * f + 8 * h)
        phases.append(PhasePlan("importance", model + taylor if on_gpu else 0, base + (0 if on_gpu else taylor),
                                {"autograd": saved, "logits": logits}))

    # Hessians for whichever method reads them (from the registry: sparsegpt, sparsegpt-mask, owl-sparsegpt,
    # DSnoT started from a SparseGPT mask), while a block is pruned: in a baseline's pass and in EBFT's own
    hessian_bytes = 3 * (3 * h * h + f * f) * 4
    needs_hessian = {m: "hessian" in _statistics(m, cfg) for m in set(cfg.baselines) | {cfg.prune.method}}
    hessians = hessian_bytes if any(needs_hessian.values()) else 0
    prune_acts = 2 * act
    prune_dev = pb * sb + hessians + inference(INFER_BATCH * cfg.calib.seqlen) + pb  # + bool masks
    phases.append(PhasePlan("prune", prune_dev + (prune_acts if acts == "device" else 0) if on_gpu else 0,
                            base + (prune_acts if acts == "host" else 0)
                            + (0 if on_gpu else hessians + inference(INFER_BATCH * cfg.calib.seqlen)),
                            {"activations": prune_acts, "hessians": hessians}))

    if cfg.ebft.epochs > 0:
        tokens = cfg.ebft.batch_size * cfg.calib.seqlen
        saved = autocast * tokens * (30 * h + 8 * f + 4 * kv)
        backward = tokens * (12 * f + 8 * h)
        state = pb * (16 + 1 + (2 if p.compute is not None else 0))
        train = state + saved + backward
        ebft_acts = 3 * act
        # On the host: the pruned copy kept for a roll-back, and (where storage is not float32) nothing else:
        # the float32 block lives on the device.
        host_extra = pb * 4
        if on_gpu:
            # A block's moments, in the order the loop runs them, each with what is live then (bench/memory.py
            # --block-7b measures them): the statistics pass and the masks (inputs and dense targets); training
            # (inputs, targets; the statistics freed); the propagation (the block back in its storage dtype, its
            # outputs a third stream). The third stream and the training state never coexist.
            infer = inference(INFER_BATCH * cfg.calib.seqlen)
            pruning = pb * sb + pb + (hessian_bytes if needs_hessian.get(cfg.prune.method) else 0) + infer
            on_device = act if acts == "device" else 0  # one stream's bytes on the device
            peak = max(pruning + 2 * on_device, train + 2 * on_device, pb * sb + pb + infer + 3 * on_device)
            phases.append(PhasePlan("ebft", peak, base + host_extra + (ebft_acts if acts == "host" else 0),
                                    {"training state": state, "autograd": saved + backward,
                                     "activations": ebft_acts}))
        else:
            ebft_prune = pb * sb + pb + (hessian_bytes if needs_hessian.get(cfg.prune.method) else 0) + \
                inference(INFER_BATCH * cfg.calib.seqlen)
            train = max(train, ebft_prune)
            float_copy = pb * 4 if sb != 4 else 0  # block.float() copies a half-precision block
            phases.append(PhasePlan("ebft", 0, base + ebft_acts + train - pb * 4 * (sb == 4) + float_copy
                                    + host_extra, {"training state": state, "autograd": saved + backward,
                                                   "activations": ebft_acts}))
    if "lora" in cfg.recoveries:
        # end to end: the whole model on the device, every block's saved activations for one batch, the
        # logits over the vocabulary (and their float32 copy and gradient), adapters with AdamW state
        tokens = cfg.lora.batch_size * cfg.calib.seqlen
        saved = autocast * tokens * (30 * h + 8 * f + 4 * kv) * s.layers
        logits = tokens * s.vocab * (2 + 4 + 4)
        adapters = s.layers * cfg.lora.rank * 4 * (h + h) * 4  # a generous bound: four projections' A and B
        lora = saved + logits + tokens * (12 * f + 8 * h) + adapters * 4
        phases.append(PhasePlan("lora", model + lora if on_gpu else 0, base + (0 if on_gpu else lora),
                                {"autograd": saved, "logits": logits}))
    return phases


# Tokens in each evaluation set with a LLaMA tokenizer (WikiText-2 test 338,535; PTB test ~82k; the C4 protocol
# takes 256 windows); a file is guessed at 4 characters per token.
EVAL_TOKENS = {"wikitext2": 340_000, "ptb": 120_000}


def _eval_windows(cfg: RunConfig, seqlen: int) -> int:
    source = cfg.eval.source
    if source.startswith("file:"):
        from pathlib import Path

        path = Path(source[5:])
        tokens = path.stat().st_size // 4 if path.is_file() else 0
    elif source == "c4":
        tokens = 256 * seqlen
    else:
        tokens = EVAL_TOKENS.get(source, 0)
    windows = tokens // seqlen
    return windows if cfg.eval.windows is None else min(cfg.eval.windows, windows)


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


def suggestion(model_config: Any, config: RunConfig, precision: Precision, capacity: int | None) -> str:
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
        plan = plan_memory(model_config, cfg, precision, device_capacity=capacity, activations=acts)
        if capacity is None or plan.peak_device <= capacity * DEVICE_HEADROOM:
            return f"try {flags} (planned device peak {_gib(plan.peak_device)})"
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


def remedy(plan: MemoryPlan, model_config: Any, config: RunConfig, precision: Precision) -> str:
    """What to change for a plan that does not fit: the device lever that fits, or what shrinks host memory."""
    if plan.device_capacity is not None and plan.peak_device > plan.device_capacity:
        return suggestion(model_config, config, precision, plan.device_capacity)
    return "use fewer --nsamples, a shorter --seqlen or fewer --eval-windows, or a machine with more memory"


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


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


def _statistics(method: str, cfg: RunConfig) -> frozenset[str]:
    """What ``method`` (any --method or --baselines value) reads of each layer's inputs, from the registry."""
    from .config import OWL_PREFIX, STRUCTURED_METHODS
    from .sparsity import get_method

    name = method[len(OWL_PREFIX):] if method.startswith(OWL_PREFIX) else method
    if name in STRUCTURED_METHODS:
        return frozenset()
    return get_method(name).needs_with(cfg.prune)
