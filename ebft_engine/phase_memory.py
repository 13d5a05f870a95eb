"""What each phase of a run holds in device and host memory, term by term (planner.py's text lists what is
counted and why; :func:`planner.plan_memory` assembles the plan from :func:`terms` and :func:`phases`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .config import RunConfig
from .device import Precision
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
    q: int  # the query projection's width (heads x head_dim; not always hidden: Qwen3)
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
                   q=shapes["q_proj"][1],
                   layers=config.num_hidden_layers, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)), block_params=block_params(config),
                   params=count_params(config))


@dataclass(frozen=True)
class PhasePlan:
    phase: str
    device: int  # peak bytes on the accelerator (0 on a CPU run: everything is host memory)
    host: int  # peak resident bytes of the process
    parts: dict[str, int] = field(default_factory=dict)  # the largest terms, for the explanation


def eval_hidden_placement(work: int, hidden: int, device_capacity: int | None) -> str:
    """Where the evaluation keeps its windows' hidden states: "device" when they (``hidden`` bytes) fit beside
    the evaluation's own device bytes (``work``: a block, the LM head, a logits chunk, a batch's transients)
    within DEVICE_HEADROOM of ``device_capacity`` (bytes; None: unknown, taken to fit), else "host"."""
    fits = device_capacity is None or work + hidden <= device_capacity * DEVICE_HEADROOM
    return "device" if fits else "host"


def zeroshot_batch_bytes(s: Shape, p: Precision, repeat: bool = False) -> int:
    """Bytes one lm-eval batch needs beside the weights: ZEROSHOT_BATCH requests of ZEROSHOT_TOKENS tokens through
    a block (the inference transient every phase counts), the residual stream, and the logits over the vocabulary
    with their float32 log-softmax (lm-eval's, under autocast; both in the storage dtype without it). No KV cache:
    zeroshot.evaluate turns it off."""
    tokens = ZEROSHOT_BATCH * ZEROSHOT_TOKENS
    per_logit = p.compute.itemsize + 4 if p.compute is not None else 2 * p.storage.itemsize
    return _inference(s, tokens, repeat) + 2 * tokens * s.hidden * p.storage.itemsize + tokens * s.vocab * per_logit


def zeroshot_placement(model_bytes: int, device_capacity: int | None, batch_bytes: int) -> str:
    """How zero-shot scoring holds the model: ``"device"`` (the whole model moves to the device) when its bytes
    and lm-eval's batch's (:func:`zeroshot_batch_bytes`) fit within DEVICE_HEADROOM of ``device_capacity`` bytes,
    or when that capacity is unknown (None: a CPU run); else ``"offload"`` (the blocks stay in host memory and
    stream to the device, zeroshot.placed)."""
    if device_capacity is None or model_bytes + batch_bytes <= device_capacity * DEVICE_HEADROOM:
        return "device"
    return "offload"


@dataclass(frozen=True)
class Terms:
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
    repeat: bool = False  # key/value heads repeated to the query heads before SDPA (models/attention.py)

    def inference(self, tokens: int) -> int:  # transient of one no-grad block call
        return _inference(self.s, tokens, self.repeat)

    def saved(self, tokens: int) -> int:  # what autograd keeps for one block's backward over ``tokens``
        repeated = 4 * self.s.q if self.repeat else 0  # SDPA keeps the repeated keys and values (2 x 2 bytes)
        return self.autocast * tokens * (30 * self.s.hidden + 8 * self.s.intermediate + 4 * self.s.kv + repeated)

    def backward(self, tokens: int) -> int:  # the backward pass's transient gradients of the widest activations
        return tokens * (12 * self.s.intermediate + 8 * self.s.hidden)


def _inference(s: Shape, tokens: int, repeat: bool = False) -> int:
    """The transient of one no-grad block call over ``tokens``: q, k, v, attention out, the MLP's widths, and the
    repeated keys and values where the blocks repeat them (models/attention.py)."""
    repeated = 4 * 2 * s.q if repeat else 0
    return tokens * (4 * (4 * s.hidden + 2 * s.kv) + 4 * 3 * s.intermediate + repeated)


def terms(s: Shape, cfg: RunConfig, p: Precision, acts: str, repeat: bool = False, from_files: bool = True) -> Terms:
    sb = p.storage.itemsize
    h, pb = s.hidden, s.block_params
    model = s.params * sb
    # the dense blocks kept to restore between variants: the load cache's copy up to 1B; above, a copy only
    # where they cannot be re-read from safetensors files (Run._keep_dense) and more than one variant runs
    copied = s.params <= CACHE_MAX_PARAMS or (not from_files and registry.variant_count(cfg) > 1)
    snapshot = s.layers * pb * sb if copied else 0
    # each method's Hessians while it prunes a block (_hessian_bytes): in a baseline's pass and in EBFT's own
    return Terms(s, cfg, p, acts, sb, on_gpu=p.device.type != "cpu", model=model,
                base=RUNTIME_BYTES + model + snapshot, act=cfg.calib.total * cfg.calib.seqlen * h * sb,
                autocast=1 if p.compute is not None else 2,
                hessian_bytes={m: _hessian_bytes(s, m, cfg) for m in set(cfg.baselines) | {cfg.prune.method}},
                repeat=repeat)


def phases(run: Terms, calib_cached: bool, gguf: bool, eval_hidden: str,
            device_capacity: int | None) -> list[PhasePlan]:
    cfg, model = run.cfg, run.model
    phases = [PhasePlan("load", 0, RUNTIME_BYTES + model + (model if gguf else 0), {"model": model}),
              _data_phase(run, calib_cached), _eval_phase(run, eval_hidden)]
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


def _data_phase(r: Terms, calib_cached: bool) -> PhasePlan:
    cfg, s = r.cfg, r.s
    gen = 0
    generated = cfg.calib.nsamples if cfg.calib.source == "self" else cfg.calib.self_nsamples
    if generated and not calib_cached:
        # generation runs a bfloat16 copy of the model with a KV cache over all sequences of a batch
        copy = s.params * 2
        kv_cache = min(generated, 32) * cfg.calib.seqlen * s.layers * 2 * s.kv * 2
        gen = copy + kv_cache + min(generated, 32) * s.vocab * 4 * 2
    return PhasePlan("data", gen if r.on_gpu else 0, r.base + (0 if r.on_gpu else gen), {"generation": gen})


def eval_terms(r: Terms) -> tuple[int, int, int]:
    """(the evaluation's device bytes besides the states: a block, the head, a batch's transients and a logits
    chunk; the hidden states of all windows; one batch's inputs), in bytes."""
    s, sb, h, seqlen = r.s, r.sb, r.s.hidden, r.cfg.eval.seqlen or 2048
    work = s.block_params * sb + s.vocab * h * sb + r.inference(EVAL_BATCH * seqlen) + HEAD_CHUNK * s.vocab * 4 * 3
    return work, _eval_windows(r.cfg, seqlen) * seqlen * h * sb, EVAL_BATCH * seqlen * h * sb


def _eval_phase(r: Terms, where: str) -> PhasePlan:
    """Evaluation: the states on the device (where="device") or on the host with two batches of inputs up."""
    work, hidden, batch = eval_terms(r)
    if not r.on_gpu:
        return PhasePlan("eval", 0, r.base + hidden + r.inference(EVAL_BATCH * (r.cfg.eval.seqlen or 2048)),
                         {"hidden states": hidden})
    on_device = where == "device"
    pinned = 1 << (hidden - 1).bit_length() if hidden else 0  # torch's pinned blocks are powers of two
    return PhasePlan("eval", work + (hidden if on_device else 2 * batch), r.base + (0 if on_device else pinned),
                     {"hidden states": hidden})


def zeroshot_mode(s: Shape, p: Precision, device_capacity: int | None, repeat: bool) -> str:
    """How zero-shot scoring will hold a model of shape ``s`` (:func:`zeroshot_placement`; a CPU run: "device")."""
    on_gpu = p.device.type != "cpu"
    return zeroshot_placement(s.params * p.storage.itemsize, device_capacity if on_gpu else None,
                              zeroshot_batch_bytes(s, p, repeat))


def _zeroshot_phase(r: Terms, device_capacity: int | None) -> PhasePlan:
    """lm-eval's tasks as phases.zero_shot runs them: in the mode :func:`zeroshot_placement` picks, the whole
    model and a batch on the device, or (offload) what lies outside the blocks (embeddings, final norm, head),
    one block's weights and a batch; the host keeps the model either way. On the CPU it is all host memory."""
    s, batch = r.s, zeroshot_batch_bytes(r.s, r.p, r.repeat)
    if not r.on_gpu:
        return PhasePlan("zeroshot", 0, r.base + batch, {"lm-eval batch": batch})
    whole = zeroshot_mode(s, r.p, device_capacity, r.repeat) == "device"
    weights = r.model if whole else (s.params - (s.layers - 1) * s.block_params) * r.sb
    return PhasePlan("zeroshot", weights + batch, r.base, {"weights": weights, "lm-eval batch": batch})


def _importance_phase(r: Terms) -> PhasePlan:
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


def _prune_phase(r: Terms) -> PhasePlan:
    pb, seqlen = r.s.block_params, r.cfg.calib.seqlen
    hessians = max(r.hessian_bytes.values())
    prune_acts = 2 * r.act
    prune_dev = pb * r.sb + hessians + r.inference(INFER_BATCH * seqlen) + pb  # + bool masks
    return PhasePlan("prune", prune_dev + (prune_acts if r.acts == "device" else 0) if r.on_gpu else 0,
                     r.base + (prune_acts if r.acts == "host" else 0)
                     + (0 if r.on_gpu else hessians + r.inference(INFER_BATCH * seqlen)),
                     {"activations": prune_acts, "hessians": hessians})


def _ebft_terms(r: Terms) -> tuple[int, int, int, int]:
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


def _ebft_phase(r: Terms) -> PhasePlan:
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


def _ebft_phase_cpu(r: Terms) -> PhasePlan:
    """EBFT on the CPU: all host memory, the larger of pruning and training a block, and the pruned copy."""
    pb, sb = r.s.block_params, r.sb
    state, autograd, train, pruning = _ebft_terms(r)
    ebft_acts = 3 * r.act
    train = max(train, pruning)
    float_copy = pb * 4 if sb != 4 else 0  # block.float() copies a half-precision block
    return PhasePlan("ebft", 0, r.base + ebft_acts + train - pb * 4 * (sb == 4) + float_copy + pb * 4,
                     {"training state": state, "autograd": autograd, "activations": ebft_acts})


def _lora_phase(r: Terms) -> PhasePlan:
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
