"""LoRA recovery (docs/methods/lora.md#two-recipes) with peft: low-rank adapters on the chosen projections of a
pruned model, its sparse weights frozen, trained end to end on the calibration tokens with the language-model
loss.

Two models come out of one training: the model with its adapters beside the sparse weights (``lora``: the
sparsity is intact, the adapter parameters are extra), and the adapters merged into the weights and the
pruning masks applied again (``lora-merged``: a plain sparse model, at the cost of what the re-masking
removes). The learning rate warms up over the first 10% of the budget (at most 100 steps) and then decays
linearly to zero; the budget is a number of epochs, or a wall-clock time (EBFT's, for a fair comparison),
in which case the schedule follows the fraction of the time used.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import LoraConfig
from ..device import Precision
from ..errors import Cancelled
from ..events import StepLoss
from .ebft import optimizer_step

MAX_EPOCHS_FOR_A_TIME_BUDGET = 1000


class _OutOfTime(Exception):
    pass


@dataclass(frozen=True)
class LoraResult:
    steps: int
    epochs: float
    seconds: float
    adapter_params: int
    first_loss: float | None
    last_loss: float | None


@contextlib.contextmanager
def lora_adapters(model: nn.Module, cfg: LoraConfig, structured: bool = False):
    """Inject adapters into ``model`` in place (its modules gain LoRA wrappers); yield the peft model. On exit
    every wrapper is removed again (merged or not, see :func:`merge_and_remask`), whatever happened."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(model, PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=cfg.target_modules(structured), bias="none"))
    try:
        yield peft_model
    finally:
        peft_model.unload()  # back to plain nn.Linear modules (after a merge, with the merged weights)
        model.requires_grad_(False)
        model.eval()


def adapter_parameters(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def train_lora(peft_model: nn.Module, ids: torch.Tensor, cfg: LoraConfig, precision: Precision, *, seed: int,
               budget_seconds: float | None, cancelled: Callable[[], bool] = lambda: False,
               label: str = "lora") -> Iterator[StepLoss]:
    """Train the adapters on (n, seq) token ids; yields a StepLoss per step (block -1: the whole model) and
    returns a LoraResult. With ``budget_seconds`` it trains until that much time is used (whole epochs or not)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    n = ids.shape[0]
    steps_per_epoch, epochs, total_steps, warmup = _budget(n, cfg, budget_seconds)
    generator = torch.Generator().manual_seed(seed)
    device = precision.device
    # fp16 (GPUs without native bf16): the language-model loss is O(1), so GradScaler's default scale fits;
    # gradients are unscaled before clipping, and a step whose gradients overflowed is skipped by the scaler.
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    peft_model.to(device)
    peft_model.train()
    start = time.perf_counter()
    step, first, last = 0, None, None
    try:
        for _epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            for b in range(steps_per_epoch):
                if cancelled():
                    raise Cancelled()
                used = time.perf_counter() - start
                if budget_seconds and used >= budget_seconds:
                    raise _OutOfTime()
                scale = _lr_scale(used, step, budget_seconds, total_steps, warmup)
                _set_lr(optimizer, cfg.lr * scale)
                batch = ids[order[b * cfg.batch_size:(b + 1) * cfg.batch_size]].to(device)
                with precision.autocast():
                    loss = peft_model(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    continue  # skip a bad batch; the adapters start at zero, so nothing is lost
                optimizer_step(loss, params, {}, optimizer, scaler, 1.0)  # no masks: the adapters are dense
                step += 1
                last = float(loss.detach())
                first = last if first is None else first
                yield StepLoss(label=label, block=-1, step=step,
                               total_steps=step + 1 if budget_seconds else total_steps, loss=last,
                               lr=cfg.lr * scale)
    except _OutOfTime:
        pass
    finally:
        _release(peft_model, params)
    seconds = time.perf_counter() - start
    return LoraResult(steps=step, epochs=step / steps_per_epoch, seconds=seconds,
                      adapter_params=adapter_parameters(peft_model), first_loss=first, last_loss=last)


def _budget(n: int, cfg: LoraConfig, budget_seconds: float | None) -> tuple[int, int, int, int | None]:
    """(steps per epoch, epochs, total steps, warm-up steps) for ``n`` sequences: ``cfg.epochs`` epochs, or
    under a time budget as many as the time allows (no warm-up steps: the warm-up is a tenth of the time)."""
    steps_per_epoch = max(n // cfg.batch_size, 1)
    epochs = MAX_EPOCHS_FOR_A_TIME_BUDGET if budget_seconds else cfg.epochs
    total_steps = epochs * steps_per_epoch
    warmup = min(100, max(1, total_steps // 10)) if not budget_seconds else None
    return steps_per_epoch, epochs, total_steps, warmup


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _release(peft_model: nn.Module, params: list[nn.Parameter]) -> None:
    """After training, whatever happened: eval mode, no gradients kept, the model back on the host."""
    peft_model.eval()
    for p in params:
        p.grad = None
    peft_model.to("cpu")


def _lr_scale(used: float, step: int, budget_seconds: float | None, total_steps: int, warmup: int | None) -> float:
    """The learning rate's factor: linear warm-up over the first 10% of the budget (``warmup`` steps of
    ``total_steps``, or a tenth of ``budget_seconds``), then linear decay to zero; at least 1e-3, so the first
    step moves too."""
    progress = used / budget_seconds if budget_seconds else step / total_steps
    warm = 0.1 if budget_seconds else warmup / total_steps
    scale = progress / warm if progress < warm else max(0.0, (1 - progress) / (1 - warm))
    return max(scale, 1e-3)


@torch.no_grad()
def merge_and_remask(peft_model: nn.Module, remask: bool = True) -> None:
    """Merge every adapter into its weight, then zero the weights the mask had pruned (one layer at a time).
    ``remask=False`` after structured pruning: there is no mask, the smaller matrices are dense."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            mask = base.weight != 0 if remask else None
            module.merge()
            if mask is not None:
                base.weight.mul_(mask)
