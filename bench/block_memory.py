"""What one block of the pipeline allocates, counted on any device: the planner's per-block terms checked on CPU.

``measure(shape, ...)`` runs, for one LLaMA block of the given width, the steps the block loop runs on the
device, in its order, and counts the bytes of every live tensor with PyTorch's own ``MemTracker``
(torch.distributed._tools.mem_tracker: a TorchDispatchMode that follows storages, so it works on the CPU and
needs no GPU):

- ``prune``: a baseline's pass (SparseGPT, whose Hessians are the largest statistics): the block in its storage
  dtype with its calibration inputs; the statistics pass; the masks; the pruned block's outputs.
- ``ebft``: EBFT from SparseGPT's masks: the statistics pass keeping the dense targets; the masks; the block in
  float32 trained for ``steps`` steps of ``batch`` sequences (AdamW, bf16 autocast, masked gradients); back in
  its storage dtype, the outputs propagated.

Each is compared with ``planner.plan_memory`` for a GPU run of the same settings (the planner's device figure
for the phase). Used by ``python bench/memory.py --block-7b``.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebft_engine import RunConfig
from ebft_engine.device import Precision
from ebft_engine.evaluate import INFER_BATCH
from ebft_engine.finetune import finetune_block
from ebft_engine.models import LlamaAdapter
from ebft_engine.planner import plan_memory
from ebft_engine.sparsity import StatsCollector, get_method

METHOD = "sparsegpt"


def _forward(block, call, hidden, precision, stats=None, keep=True):
    out = torch.empty_like(hidden) if keep else None
    for start in range(0, hidden.shape[0], INFER_BATCH):
        with torch.no_grad(), precision.autocast():
            y = call(block, hidden[start:start + INFER_BATCH])
        if stats is not None:
            stats.count(y.shape[0])
        if keep:
            out[start:start + INFER_BATCH] = y.to(out.dtype)
    return out


def _prune(adapter, block, stats, cfg) -> dict:
    method = get_method(METHOD)
    masks = {}
    for name, linear in adapter.linears(block).items():
        result = method.fn(linear.weight.data, stats.layer_stats(name), cfg.prune.sparsity, cfg.prune.nm,
                           layer=name, cfg=cfg.prune)
        with torch.no_grad():
            if result.weight is not None:
                linear.weight.copy_(result.weight)
            linear.weight.mul_(result.mask)
        masks[linear.weight] = result.mask
    return masks


def measure(shape: dict[str, Any], nsamples: int, seqlen: int, batch: int, steps: int) -> dict[str, dict]:
    """Measured and planned peak bytes of the ``prune`` and ``ebft`` phases for one block (see the module)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_hidden_layers=1, vocab_size=256, max_position_embeddings=seqlen,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    model = meta.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    adapter = LlamaAdapter(model)
    cpu = Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16)  # 7B's storage and compute
    kwargs = adapter.block_kwargs(seqlen, cpu.device, cpu.storage)
    call = lambda b, x: adapter.call_block(b, x, kwargs)  # noqa: E731
    run_cfg = RunConfig.from_dict({"model": "tiny-random", "prune": {"method": METHOD, "sparsity": 0.7},
                                   "calib": {"source": "self", "nsamples": nsamples, "seqlen": seqlen},
                                   "ebft": {"epochs": 1, "batch_size": batch}, "baselines": [METHOD],
                                   "eval": {"seqlen": seqlen, "windows": 1}})
    gpu = Precision(torch.device("cuda"), torch.bfloat16, torch.bfloat16)
    plan = plan_memory(config, run_cfg, gpu, activations="device")
    result = {}
    for phase in ("prune", "ebft"):
        block = copy.deepcopy(adapter.blocks[0])
        peaks = []
        with _Segment(block, peaks):  # the statistics pass and the masks (the block in its storage dtype)
            hidden = torch.randn(nsamples, seqlen, config.hidden_size, dtype=cpu.storage)
            stats = StatsCollector(get_method(METHOD).needs_with(run_cfg.prune))
            with stats.attach(adapter.linears(block)):
                targets = _forward(block, call, hidden, cpu, stats=stats, keep=phase == "ebft")
            masks = _prune(adapter, block, stats, run_cfg)
            stats = None
        carried = _bytes(hidden, targets, *masks.values())  # live into the next segments, allocated before them
        if phase == "ebft":
            block.float()
            # finetune_block keeps the pruned weights for a roll-back on the host (off the device on a GPU; here
            # host and device are one): not a device byte, taken out of the training segment
            roll_back = sum(p.numel() * 4 for p in block.parameters())
            with _Segment(block, peaks, carried - roll_back):
                gen = finetune_block(block, call, hidden, targets, masks, run_cfg.ebft, cpu, label="ebft",
                                     index=0, seed=0)
                for _ in range(steps):
                    next(gen)
                gen.close()
            block.to(cpu.storage)
        with _Segment(block, peaks, carried):  # the pruned (and trained) block's outputs, propagated
            outputs = _forward(block, call, hidden, cpu)
            del outputs
        result[phase] = {"measured": max(peaks), "planned": plan.phase(phase).device, "segments": peaks}
    return result


def _bytes(*tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created while it is active and still alive (a storage is
    forgotten when it is freed), with the peak: device-agnostic, so a GPU's allocations can be counted on the CPU.
    PyTorch's own MemTracker does this per module, but registers gradient hooks on every parameter it meets,
    which fails on the frozen blocks of a pruning pass."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage())
        return out

    def _add(self, storage) -> None:
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


class _Segment:
    """Peak bytes of one stretch of the block loop: what it allocates (:class:`LiveBytes`), plus the block's
    tensors as they are when it starts and ``carried`` bytes allocated before it and still live."""

    def __init__(self, block, peaks: list[int], carried: int = 0):
        self.counter, self.peaks = LiveBytes(), peaks
        self.carried = carried + _bytes(*block.parameters(), *block.buffers())  # the block, allocated before

    def __enter__(self):
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        self.peaks.append(self.counter.peak + self.carried)
        return False
