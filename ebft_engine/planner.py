"""The memory planner: peak device and host memory of each phase, predicted from the model's config and the run
config before any weight is loaded; and where the calibration activations live (device or pinned host).

What is counted (bytes; P = model parameters, Pb = one block's, L = blocks, N = calibration tokens, h/f = hidden
and MLP widths, kv = key/value width, T = tokens of one training batch):

- the model, P x storage bytes, on the host (a block at a time visits the device); the dense block copy kept
  to restore between variants, up to 1B (larger ones re-read their memory-mapped files, FileBackedBlocks);
- calibration activations, N x h x storage bytes each: inputs, dense targets (EBFT), outputs: three at once;
- EBFT training state for one block: float32 weights, gradients and two AdamW moments (16 bytes per weight),
  a bool mask (1), the bf16 copies autocast makes of the weights (2), plus what autograd keeps for backward:
  30h + 8f + 4kv bytes per token under bf16 autocast (measured exactly by summing saved tensors of a LLaMA
  block with saved_tensors_hooks, widths 576 to 2048: within 0.1%), doubled without autocast, and the
  backward pass's transient gradients of the widest activations (about 12f + 8h per token);
- Hessians: (3h^2 + f^2) float32 per block, times three (sums, scaled copy, factor); more for ALPS (_hessian_bytes);
- structured pruning's importance pass (LLM-Pruner): the whole model on the device and one backward pass over
  taylor_samples x taylor_seqlen tokens with activation checkpointing, each weight's gradient reduced to its
  groups' sums as soon as it exists;
- evaluation: one block, the LM head and a 256-token slice of logits on the device; all hidden states on the host;
- on the host, the Python runtime with torch and transformers (RUNTIME_BYTES, measured) and, while a GGUF
  model loads, one transient copy of its weights (the dequantised tensors). A safetensors checkpoint is
  memory-mapped: its pages are reclaimable page cache, not a second copy, so nothing is added for it;
- learned masks (ebft-mask): the block's dense float32 copy, float32 latent weights and a second mask;
- zero-shot scoring (lm-eval, when tasks are set): one batch of 8 requests of up to 1024 tokens (zeroshot.BATCH,
  PLANNED_TOKENS) with its logits over the vocabulary, beside the whole model on the device when both fit
  (:func:`zeroshot_placement`), else beside what lies outside the blocks and one block streamed from the host.
``bench/memory.py`` checks the planner against measurement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from . import registry
from .config import RunConfig
from .device import Precision, capacities  # noqa: F401  (capacities: callers import it from here)
from .evaluate import EVAL_BATCH, HEAD_CHUNK, INFER_BATCH
from .models import CACHE_MAX_PARAMS, block_params, count_params, projection_shapes
from .zeroshot import BATCH as ZEROSHOT_BATCH, PLANNED_TOKENS as ZEROSHOT_TOKENS

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
    zeroshot: str | None = None  # how zero-shot scoring holds the model: "device" or "offload"; None: no tasks

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
                     + f"; calibration activations on the {self.activations}"
                     + ("; zero-shot with the blocks offloaded to the host" if self.zeroshot == "offload" else ""))
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
        trial = _phases(s, config, precision, "device", calib_cached, gguf, device_capacity)
        fits = device_capacity is None or max(p.device for p in trial) <= device_capacity * DEVICE_HEADROOM
        choice = "device" if fits else "host"
    phases = _phases(s, config, precision, choice, calib_cached, gguf, device_capacity)
    return MemoryPlan(device_type=precision.device.type, activations=choice, phases=tuple(phases),
                      device_capacity=device_capacity, host_capacity=host_capacity,
                      zeroshot=_zeroshot_mode(s, precision, device_capacity) if config.eval.zeroshot else None)


def zeroshot_batch_bytes(s: Shape, p: Precision) -> int:
    """Bytes one lm-eval batch needs beside the weights: ZEROSHOT_BATCH requests of ZEROSHOT_TOKENS tokens through
    a block (the inference transient every phase counts), the residual stream, and the logits over the vocabulary
    with their float32 log-softmax (lm-eval's, under autocast; both in the storage dtype without it). No KV cache:
    zeroshot.evaluate turns it off."""
    tokens = ZEROSHOT_BATCH * ZEROSHOT_TOKENS
    per_logit = p.compute.itemsize + 4 if p.compute is not None else 2 * p.storage.itemsize
    return _inference(s, tokens) + 2 * tokens * s.hidden * p.storage.itemsize + tokens * s.vocab * per_logit


def zeroshot_placement(model_bytes: int, device_capacity: int | None, batch_bytes: int) -> str:
    """How zero-shot scoring holds the model: ``"device"`` (the whole model moves to the device) when its bytes
    and lm-eval's batch's (:func:`zeroshot_batch_bytes`) fit within DEVICE_HEADROOM of ``device_capacity`` bytes,
    or when that capacity is unknown (None: a CPU run); else ``"offload"`` (the blocks stay in host memory and
    stream to the device, zeroshot.placed)."""
    if device_capacity is None or model_bytes + batch_bytes <= device_capacity * DEVICE_HEADROOM:
        return "device"
    return "offload"


def _zeroshot_mode(s: Shape, p: Precision, device_capacity: int | None) -> str:
    on_gpu = p.device.type != "cpu"
    return zeroshot_placement(s.params * p.storage.itemsize, device_capacity if on_gpu else None,
                              zeroshot_batch_bytes(s, p))


@dataclass(frozen=True)
class _Run:
    """What every phase's estimate reads: the model's shape, the run, the precision and the shared terms."""

    s: Shape
    cfg: RunConfig
    p: Precision
    acts: str  # where calibration activations live: "device" or "host"
    sb: int  # storage bytes per weight
    on_gpu: bool
    model: int  # the model's bytes
    base: int  # host bytes held throughout: runtime, model, dense snapshot
    act: int  # one stream of calibration activations
    autocast: int  # 1 under autocast, 2 without (autograd keeps float32 activations)
    hessian_bytes: dict[str, int]  # by pruning method: what its Hessians hold while it prunes a block (or 0)

    def inference(self, tokens: int) -> int:
        return _inference(self.s, tokens)

    def saved(self, tokens: int) -> int:  # what autograd keeps for one block's backward over ``tokens``
        return self.autocast * tokens * (30 * self.s.hidden + 8 * self.s.intermediate + 4 * self.s.kv)

    def backward(self, tokens: int) -> int:  # the backward pass's transient gradients of the widest activations
        return tokens * (12 * self.s.intermediate + 8 * self.s.hidden)


def _inference(s: Shape, tokens: int) -> int:
    """The transient of one no-grad block call over ``tokens``: q, k, v, attention out, the MLP's widths."""
    return tokens * (4 * (4 * s.hidden + 2 * s.kv) + 4 * 3 * s.intermediate)


def _phases(s: Shape, cfg: RunConfig, p: Precision, acts: str, calib_cached: bool, gguf: bool,
            device_capacity: int | None) -> list[PhasePlan]:
    sb = p.storage.itemsize
    h, pb = s.hidden, s.block_params
    model = s.params * sb
    snapshot = s.layers * pb * sb if s.params <= CACHE_MAX_PARAMS else 0
    # each method's Hessians while it prunes a block (_hessian_bytes): in a baseline's pass and in EBFT's own
    run = _Run(s, cfg, p, acts, sb, on_gpu=p.device.type != "cpu", model=model,
               base=RUNTIME_BYTES + model + snapshot, act=cfg.calib.total * cfg.calib.seqlen * h * sb,
               autocast=1 if p.compute is not None else 2,
               hessian_bytes={m: _hessian_bytes(s, m, cfg) for m in set(cfg.baselines) | {cfg.prune.method}})
    phases = [PhasePlan("load", 0, RUNTIME_BYTES + model + (model if gguf else 0), {"model": model}),
              _data_phase(run, calib_cached), _eval_phase(run)]
    if cfg.eval.zeroshot:
        phases.append(_zeroshot_phase(run, device_capacity))
    if cfg.prune.structured:
        phases.append(_importance_phase(run))
    phases.append(_prune_phase(run))
    if cfg.ebft.epochs > 0:
        phases.append(_ebft_phase(run) if run.on_gpu else _ebft_phase_cpu(run))
    if "lora" in cfg.recoveries:
        phases.append(_lora_phase(run))
    return phases


def _data_phase(r: _Run, calib_cached: bool) -> PhasePlan:
    cfg, s = r.cfg, r.s
    gen = 0
    generated = cfg.calib.nsamples if cfg.calib.source == "self" else cfg.calib.self_nsamples
    if generated and not calib_cached:
        # generation runs a bfloat16 copy of the model with a KV cache over all sequences of a batch
        copy = s.params * 2
        kv_cache = min(generated, 32) * cfg.calib.seqlen * s.layers * 2 * s.kv * 2
        gen = copy + kv_cache + min(generated, 32) * s.vocab * 4 * 2
    return PhasePlan("data", gen if r.on_gpu else 0, r.base + (0 if r.on_gpu else gen), {"generation": gen})


def _eval_phase(r: _Run) -> PhasePlan:
    s, sb, h = r.s, r.sb, r.s.hidden
    eval_seqlen = r.cfg.eval.seqlen or 2048
    eval_hidden = _eval_windows(r.cfg, eval_seqlen) * eval_seqlen * h * sb
    eval_dev = (s.block_params * sb + s.vocab * h * sb + r.inference(EVAL_BATCH * eval_seqlen)
                + HEAD_CHUNK * s.vocab * 4 * 3)
    return PhasePlan("eval", eval_dev if r.on_gpu else 0,
                     r.base + eval_hidden + (0 if r.on_gpu else r.inference(EVAL_BATCH * eval_seqlen)),
                     {"hidden states": eval_hidden})


def _zeroshot_phase(r: _Run, device_capacity: int | None) -> PhasePlan:
    """lm-eval's tasks as phases.zero_shot runs them: in the mode :func:`zeroshot_placement` picks, the whole
    model and a batch on the device, or (offload) what lies outside the blocks (embeddings, final norm, head),
    one block's weights and a batch; the host keeps the model either way. On the CPU it is all host memory."""
    s, batch = r.s, zeroshot_batch_bytes(r.s, r.p)
    if not r.on_gpu:
        return PhasePlan("zeroshot", 0, r.base + batch, {"lm-eval batch": batch})
    whole = _zeroshot_mode(s, r.p, device_capacity) == "device"
    weights = r.model if whole else (s.params - (s.layers - 1) * s.block_params) * r.sb
    return PhasePlan("zeroshot", weights + batch, r.base, {"weights": weights, "lm-eval batch": batch})


def _importance_phase(r: _Run) -> PhasePlan:
    """LLM-Pruner's importance pass: the whole model on the device, one backward of the language-model loss over
    a few short sequences; each weight's gradient is reduced to its group sums and dropped at once."""
    s, h, f = r.s, r.s.hidden, r.s.intermediate
    tokens = r.cfg.prune.taylor_samples * r.cfg.prune.taylor_seqlen
    # activation checkpointing: every block's input, and one block's saved tensors while it is recomputed
    saved = tokens * h * r.sb * s.layers + r.saved(tokens)
    logits = tokens * s.vocab * (2 + 4 + 4)
    grads = 3 * h * f * 4  # the widest weight's gradient and its float32 product with the weight
    taylor = saved + logits + grads + r.backward(tokens)
    return PhasePlan("importance", r.model + taylor if r.on_gpu else 0, r.base + (0 if r.on_gpu else taylor),
                     {"autograd": saved, "logits": logits})


def _prune_phase(r: _Run) -> PhasePlan:
    pb, seqlen = r.s.block_params, r.cfg.calib.seqlen
    hessians = max(r.hessian_bytes.values())
    prune_acts = 2 * r.act
    prune_dev = pb * r.sb + hessians + r.inference(INFER_BATCH * seqlen) + pb  # + bool masks
    return PhasePlan("prune", prune_dev + (prune_acts if r.acts == "device" else 0) if r.on_gpu else 0,
                     r.base + (prune_acts if r.acts == "host" else 0)
                     + (0 if r.on_gpu else hessians + r.inference(INFER_BATCH * seqlen)),
                     {"activations": prune_acts, "hessians": hessians})


def _ebft_terms(r: _Run) -> tuple[int, int, int, int]:
    """(training state, autograd, the training step's bytes, pruning one block's bytes) of an EBFT block."""
    pb = r.s.block_params
    tokens = r.cfg.ebft.batch_size * r.cfg.calib.seqlen
    autograd = r.saved(tokens) + r.backward(tokens)
    state = pb * (16 + 1 + (2 if r.p.compute is not None else 0))
    hessian = r.hessian_bytes[r.cfg.prune.method]
    pruning = pb * r.sb + pb + hessian + r.inference(INFER_BATCH * r.cfg.calib.seqlen)
    if any(name.startswith("ebft-mask") for name in r.cfg.recoveries):  # learned masks (finetune/masks.py):
        pruning += pb * 4  # the dense float32 copy; then float32 latents, a second mask, one layer's selection buffers
        state += pb * (4 + 1) + r.s.hidden * r.s.intermediate * 20
    return state, autograd, state + autograd, pruning


def _ebft_phase(r: _Run) -> PhasePlan:
    """EBFT on an accelerator. A block's moments, in the order the loop runs them, each with what is live then
    (bench/memory.py --block-7b measures them): the statistics pass and the masks (inputs and dense targets);
    training (inputs, targets; the statistics freed); the propagation (the block back in its storage dtype, its
    outputs a third stream). The third stream and the training state never coexist. On the host: the pruned
    copy kept for a roll-back, and (where storage is not float32) nothing else: the float32 block lives on the
    device."""
    pb = r.s.block_params
    state, autograd, train, pruning = _ebft_terms(r)
    ebft_acts = 3 * r.act
    infer = r.inference(INFER_BATCH * r.cfg.calib.seqlen)
    on_device = r.act if r.acts == "device" else 0  # one stream's bytes on the device
    peak = max(pruning + 2 * on_device, train + 2 * on_device, pb * r.sb + pb + infer + 3 * on_device)
    return PhasePlan("ebft", peak, r.base + pb * 4 + (ebft_acts if r.acts == "host" else 0),
                     {"training state": state, "autograd": autograd, "activations": ebft_acts})


def _ebft_phase_cpu(r: _Run) -> PhasePlan:
    """EBFT on the CPU: all host memory, the larger of pruning and training a block, and the pruned copy."""
    pb, sb = r.s.block_params, r.sb
    state, autograd, train, pruning = _ebft_terms(r)
    ebft_acts = 3 * r.act
    train = max(train, pruning)
    float_copy = pb * 4 if sb != 4 else 0  # block.float() copies a half-precision block
    return PhasePlan("ebft", 0, r.base + ebft_acts + train - pb * 4 * (sb == 4) + float_copy + pb * 4,
                     {"training state": state, "autograd": autograd, "activations": ebft_acts})


def _lora_phase(r: _Run) -> PhasePlan:
    """End to end: the whole model on the device, every block's saved activations for one batch, the logits over
    the vocabulary (and their float32 copy and gradient), adapters with AdamW state."""
    s, h = r.s, r.s.hidden
    tokens = r.cfg.lora.batch_size * r.cfg.calib.seqlen
    saved = r.saved(tokens) * s.layers
    logits = tokens * s.vocab * (2 + 4 + 4)
    adapters = s.layers * r.cfg.lora.rank * 4 * (h + h) * 4  # a generous bound: four projections' A and B
    lora = saved + logits + r.backward(tokens) + adapters * 4
    return PhasePlan("lora", r.model + lora if r.on_gpu else 0, r.base + (0 if r.on_gpu else lora),
                     {"autograd": saved, "logits": logits})


# Tokens in each evaluation set with a LLaMA tokenizer (WikiText-2 test 338,535; PTB test ~82k; the C4 protocol
# takes 256 windows); a file is guessed at 4 characters per token.
EVAL_TOKENS = {"wikitext2": 340_000, "ptb": 120_000}


def _eval_windows(cfg: RunConfig, seqlen: int) -> int:
    source = cfg.eval.source
    if source.startswith("file:"):
        path = Path(source[5:])
        tokens = path.stat().st_size // 4 if path.is_file() else 0
    elif source == "c4":
        tokens = 256 * seqlen
    else:
        tokens = EVAL_TOKENS.get(source, 0)
    windows = tokens // seqlen
    return windows if cfg.eval.windows is None else min(cfg.eval.windows, windows)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def _hessian_bytes(s: Shape, method: str, cfg: RunConfig) -> int:
    """What ``method`` (any --method or --baselines value) holds of one block's Hessians, if it reads them: each
    group's sums, scaled copy and factor; ALPS (sparsity/alps.py) adds the larger of its eigendecomposition's input
    and workspace (~4f^2) and its ADMM's float32 buffers of the widest layer (11 measured, 12 planned)."""
    from .sparsity import get_method

    _allocation, entry = registry.split_method(method)
    if entry.kind != "mask" or "hessian" not in get_method(entry.name).needs_with(cfg.prune):
        return 0
    h, f = s.hidden, s.intermediate
    return (3 * (3 * h * h + f * f) + (max(4 * f * f, 12 * h * f) if entry.name == "alps" else 0)) * 4
