"""Typed progress events: the one seam between the engine and the CLI, the lab and the run folder.

Every event is a small frozen dataclass with a ``kind``; ``to_json`` / ``event_from_dict`` round-trip them
through ``events.jsonl``. Labels name what a phase works on: ``dense``, a baseline method (``wanda``) or
``ebft``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    run_dir: str
    config: dict[str, Any]
    time: float = field(default_factory=time.time)
    resumed: bool = False  # True when ``resume`` continues an earlier run in the same folder
    kind: str = "run_started"


@dataclass(frozen=True)
class PhaseStarted:
    """A phase begins: load, calibrate, prune, ebft, eval."""

    phase: str
    label: str = ""
    kind: str = "phase_started"


@dataclass(frozen=True)
class PhaseFinished:
    phase: str
    label: str
    seconds: float
    kind: str = "phase_finished"


@dataclass(frozen=True)
class BlockStarted:
    label: str
    block: int
    total: int
    kind: str = "block_started"


@dataclass(frozen=True)
class StepLoss:
    """One optimiser step of EBFT on a block: the training batch's reconstruction MSE.

    ``mask_change``: for a recovery that learns the masks (``ebft-mask``), the fraction of the block's masked
    weights whose keep/prune state this step flipped (0 once the masks have settled); None otherwise."""

    label: str
    block: int
    step: int
    total_steps: int
    loss: float
    lr: float
    mask_change: float | None = None
    kind: str = "step_loss"


@dataclass(frozen=True)
class BlockFinished:
    """A block is done: its masks are final and its output is propagated.

    ``initial_loss`` / ``final_loss`` are the reconstruction MSE over the whole calibration set before and
    after EBFT (None for a prune-only pass); ``sparsity`` is measured over the block's pruned linears and
    ``layers`` per projection.
    """

    label: str
    block: int
    total: int
    initial_loss: float | None
    final_loss: float | None
    seconds: float
    sparsity: float
    layers: dict[str, float] | None = None  # measured sparsity of each projection (q_proj ... down_proj)
    kind: str = "block_finished"


@dataclass(frozen=True)
class EvalFinished:
    label: str
    ppl: float
    source: str
    seqlen: int
    windows: int
    tokens: int
    partial: bool
    seconds: float
    kind: str = "eval_finished"


@dataclass(frozen=True)
class ZeroShotFinished:
    """lm-eval zero-shot accuracy of one model: {task: {"acc": x, "acc_norm": y, "examples": n}}."""

    label: str
    results: dict[str, dict[str, Any]]
    limit: int | None
    seconds: float
    kind: str = "zeroshot_finished"


@dataclass(frozen=True)
class Notice:
    """Something a person should read: level is info, warning or error."""

    level: str
    text: str
    kind: str = "notice"


@dataclass(frozen=True)
class RunFinished:
    """Always the last event: status is finished, cancelled or failed; summary holds what was measured."""

    status: str
    summary: dict[str, Any]
    kind: str = "run_finished"


Event = Union[RunStarted, PhaseStarted, PhaseFinished, BlockStarted, StepLoss, BlockFinished, EvalFinished,
              ZeroShotFinished, Notice, RunFinished]
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in Event.__args__}  # type: ignore[attr-defined]


def event_to_dict(event: Event) -> dict[str, Any]:
    return dataclasses.asdict(event)


def event_from_dict(data: dict[str, Any]) -> Event:
    """Inverse of :func:`event_to_dict`; raises KeyError for an unknown kind."""
    cls = EVENT_TYPES[data["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
