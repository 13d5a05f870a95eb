"""EBFT's block trainer (Guo et al. 2024; docs/methods/ebft.md#block-wise-reconstruction): fine-tune one pruned
block by backpropagation so its output matches the dense block's output on the same (sparse-propagated)
inputs, masks held fixed.

Trains every parameter of the block: the seven projections and both RMSNorm weights (plus biases or q/k
norms where a family has them). Pruned weights start at zero and their gradients are masked to zero, so
AdamW (whose decoupled decay of a zero is zero) keeps them exactly zero at every step.

Precision: float32 master weights; the forward under bf16 autocast where supported, else fp16 autocast with
a gradient scaler whose gradients are unscaled before clipping (the reference clips scaled gradients, a
quirk we do not reproduce: docs/methods/ebft.md#gradient-clipping-and-loss-scaling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import EbftConfig
from ..device import Precision
from ..errors import Cancelled
from ..events import StepLoss

BlockCall = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    initial_loss: float
    steps: int
    rolled_back: bool  # a non-finite loss restored the block to its pruned weights
    pruned_state: list[torch.Tensor] = field(default_factory=list, repr=False)

    def restore_pruned(self, block: nn.Module) -> None:
        """Put the block's pruned (untrained) weights back, e.g. when training raised the loss."""
        with torch.no_grad():
            for p, saved in zip(block.parameters(), self.pruned_state):
                p.copy_(saved.to(p.dtype))


def batch_mse(block: nn.Module, call: BlockCall, inputs: torch.Tensor, targets: torch.Tensor,
              precision: Precision, batch_size: int) -> float:
    """Mean squared error of ``call(block, inputs)`` against ``targets`` over all samples (no grad)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size].to(precision.device)
            y = targets[start:start + batch_size].to(precision.device)
            with precision.autocast():
                out = call(block, x)
            total += torch.sum((out.float() - y.float()) ** 2).item()
            count += y.numel()
    return total / count


def finetune_block(block: nn.Module, call: BlockCall, inputs: torch.Tensor, targets: torch.Tensor,
                   masks: dict[nn.Parameter, torch.Tensor], cfg: EbftConfig, precision: Precision, *,
                   label: str, index: int, seed: int, cancelled: Callable[[], bool] = lambda: False,
                   after_step: Callable[[int, int], float | None] | None = None) -> Iterator[StepLoss]:
    """Train ``block`` in place; yields a StepLoss per optimiser step and returns a TrainResult.

    Args:
        block: the pruned block, float32, on ``precision.device``.
        call: runs the block on a (batch, seq, hidden) tensor.
        inputs / targets: (nsamples, seq, hidden) sparse-model inputs and dense-block outputs.
        masks: parameter -> bool keep-mask, for the pruned weights: their gradients are zeroed at every step and
            the weights multiplied by it at the end. Read at every step, so a mask learner may fill it late.
        seed: seeds the shuffling, so a block trains the same way every time.
        after_step: called after each optimiser step with (step, total steps); what it returns is the step's
            ``StepLoss.mask_change`` (a mask learner updates the masks here: finetune/masks.py).
    """
    params = [p for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    pruned_state = [p.detach().to("cpu", copy=True) for p in params]  # for a roll-back; kept off the device
    n = inputs.shape[0]
    steps_per_epoch = max(n // cfg.batch_size, 1)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = _adamw(params, cfg, precision.device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps))
    scaler = _fp16_scaler(block, call, inputs[:cfg.batch_size], targets[:cfg.batch_size], precision,
                          steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    initial = batch_mse(block, call, inputs, targets, precision, cfg.batch_size)
    step, rolled_back = 0, False
    block.train()
    try:
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=generator)
            for b in range(steps_per_epoch):
                if cancelled():
                    raise Cancelled()
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                x, y = inputs[idx].to(precision.device), targets[idx].to(precision.device)
                with precision.autocast():
                    out = call(block, x)
                loss = torch.mean((out.float() - y.float()) ** 2)
                if not torch.isfinite(loss):
                    rolled_back = True
                    break
                lr = schedule.get_last_lr()[0]
                optimizer_step(loss, params, masks, optimizer, scaler, cfg.max_grad_norm)
                schedule.step()
                step += 1
                change = after_step(step, total_steps) if after_step is not None else None
                yield StepLoss(label=label, block=index, step=step, total_steps=total_steps,
                               loss=float(loss.detach()), lr=lr, mask_change=change)
            if rolled_back:
                break
    finally:
        block.eval()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    rolled_back = _settle(params, masks, pruned_state, rolled_back)
    return TrainResult(initial_loss=initial, steps=step, rolled_back=rolled_back, pruned_state=pruned_state)


def _fp16_scaler(block: nn.Module, call: BlockCall, inputs: torch.Tensor, targets: torch.Tensor,
                 precision: Precision, steps_per_epoch: int):
    """fp16 only (else None): a GradScaler whose loss scale is fitted to this block's gradients on one batch
    (``inputs`` / ``targets``), free to grow within it."""
    if not precision.needs_scaler:
        return None
    scale = fp16_loss_scale(block, call, inputs, targets, precision)
    return torch.amp.GradScaler(precision.device.type, init_scale=scale, growth_interval=max(steps_per_epoch, 1))


def _settle(params: list[nn.Parameter], masks: dict[nn.Parameter, torch.Tensor], pruned_state: list[torch.Tensor],
            rolled_back: bool) -> bool:
    """After training: restore the pruned weights when training rolled back or left a non-finite weight, then
    bake the masks in (pruned weights exactly zero, whatever happened); return whether the block rolled back."""
    with torch.no_grad():
        if rolled_back or not all(torch.isfinite(p).all() for p in params):
            rolled_back = True
            for p, saved in zip(params, pruned_state):
                p.copy_(saved)
        for p, mask in masks.items():
            p.mul_(mask)
    return rolled_back


# float16's largest finite value is 65504 (~2^16): aim the largest scaled gradient at 2^14, a 4x margin.
FP16_GRADIENT_TARGET = 2.0 ** 14
FP16_PROBE_SCALE = 2.0 ** 16  # GradScaler's default, where the probe starts
FP16_MAX_SCALE = 2.0 ** 48


def fp16_loss_scale(block: nn.Module, call: BlockCall, inputs: torch.Tensor, targets: torch.Tensor,
                    precision: Precision) -> float:
    """The power-of-two loss scale for float16 training of ``block``: its largest parameter gradient on one
    batch lands near :data:`FP16_GRADIENT_TARGET`.

    EBFT's loss is a mean over batch x tokens x hidden (LLaMA-7B at 8 x 1024: 3.4e7 elements), so a well
    reconstructed early block has gradients near 1e-10: at GradScaler's default scale of 2^16 they fall into
    float16's subnormal range or to zero, and the block barely trains. One probe backward (halving the probe
    while it overflows) measures the gradients instead. The gradients used for the step are always unscaled
    before clipping, so the scale changes nothing but what float16 can represent.

    Args:
        inputs / targets: one batch, (batch, seq, hidden), on any device.

    Returns:
        the initial scale for ``torch.amp.GradScaler``, a power of two in [1, 2^48].
    """
    params = [p for p in block.parameters() if p.requires_grad]
    x, y = inputs.to(precision.device), targets.to(precision.device)
    probe = FP16_PROBE_SCALE
    try:
        for _ in range(64):
            with precision.autocast():
                out = call(block, x)
            loss = torch.mean((out.float() - y.float()) ** 2)
            if not torch.isfinite(loss):
                return FP16_PROBE_SCALE  # the training loop rolls the block back; the scale does not matter
            (loss * probe).backward()
            biggest = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
            for p in params:
                p.grad = None
            if math.isfinite(biggest):
                break
            probe /= 2
    finally:
        for p in params:
            p.grad = None
    if not math.isfinite(biggest) or biggest == 0:
        return probe
    return float(min(max(2.0 ** math.floor(math.log2(FP16_GRADIENT_TARGET * probe / biggest)), 1.0), FP16_MAX_SCALE))


def _adamw(params: list[nn.Parameter], cfg: EbftConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused AdamW is not built for every device
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def optimizer_step(loss: torch.Tensor, params: list[nn.Parameter], masks: dict[nn.Parameter, torch.Tensor],
                   optimizer: torch.optim.Optimizer, scaler, max_grad_norm: float) -> None:
    """One optimiser step on ``loss``: backward (scaled and unscaled again under fp16), the pruned weights'
    gradients zeroed by ``masks``, gradients clipped to ``max_grad_norm``, the step, gradients cleared, and the
    pruned weights multiplied by ``masks`` (exactly zero after every step)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    for p, mask in masks.items():
        if p.grad is not None:
            p.grad.mul_(mask)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # a weight the mask dropped mid-training (ebft-mask) still has Adam momentum: zero it
        for p, mask in masks.items():
            p.mul_(mask)
