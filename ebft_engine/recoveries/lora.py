"""LoRA from the pruned model (Hu et al. 2022, docs/methods/lora.md): a model recovery. The blocks are pruned as
for a baseline, then adapters train on the calibration tokens; it reports ``lora`` (adapters beside the sparse
weights) and ``lora-merged`` (merged and re-masked)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from ..events import Event, Notice
from ..finetune.lora import lora_adapters, merge_and_remask, train_lora
from ..registry import RecoveryEntry, add_recovery
from ..summary import LoraInfo
from .base import PruneOnly


class Lora(PruneOnly):
    """LoRA from the pruned model (Hu et al. 2022): adapters on the calibration tokens, evaluated beside the
    sparse weights (``lora``), then merged and re-masked (``lora-merged``)."""

    name = "lora"

    def active(self, cfg) -> bool:
        return True

    def labels(self, label: str) -> tuple[str, ...]:
        return ("lora", "lora-merged")

    def after(self, run, label: str) -> Iterator[Event]:
        cfg, structured = run.config.lora, run.config.prune.structured
        budget = run.summary.seconds.get("ebft:ebft") if cfg.budget == "ebft" else None
        if cfg.budget == "ebft" and budget is None:
            yield Notice("warning", "lora.budget is ebft but EBFT did not run first in this run: LoRA trains for "
                                    f"{cfg.epochs} epochs instead")
        run.stage, run.where = "lora", "the LoRA training"
        with lora_adapters(run.model, cfg, structured=structured) as peft_model:
            result = yield from run.phase("lora", "lora", _train_lora(run, peft_model, budget))
            run.summary.lora = LoraInfo(
                steps=result.steps, epochs=round(result.epochs, 2), seconds=round(result.seconds, 1),
                adapter_params=result.adapter_params, targets=cfg.target_modules(structured), rank=cfg.rank,
                alpha=cfg.alpha, budget="ebft's time" if budget else f"{cfg.epochs} epochs",
                first_loss=result.first_loss, last_loss=result.last_loss)
            if "lora" not in run.summary.ppl:
                yield from run.evaluate("lora")
            merge_and_remask(peft_model, remask=not structured)
        run.measure("lora-merged")
        if "lora-merged" not in run.summary.ppl:
            yield from run.evaluate("lora-merged")


def _train_lora(run, peft_model: nn.Module, budget: float | None):
    cfg = run.config.lora
    result = yield from train_lora(peft_model, run.calib_ids, cfg, run.precision, seed=run.config.seed,
                                   budget_seconds=budget, cancelled=run.cancelled)
    yield Notice("info", f"LoRA: {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.0f} s, "
                         f"{result.adapter_params:,} adapter parameters, loss {result.first_loss:.3f} -> "
                         f"{result.last_loss:.3f}" if result.steps else "LoRA: no training step fitted in the budget")
    return result


add_recovery(RecoveryEntry("lora", "LoRA adapters on the pruned model (also reports lora-merged)", Lora,
                           labels=("lora", "lora-merged"), rank=2))
