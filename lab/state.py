"""What the page shows about a run, folded from the engine's events: a pure function of the event list."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from ebft_engine import (BlockFinished, BlockStarted, EvalFinished, Event, Notice, PhaseFinished, PhaseStarted,
                         RunFinished, RunStarted, StepLoss, ZeroShotFinished)
from ebft_engine.summary import EvalInfo, RunSummary

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RunView:
    """Everything the plots and tables need; ``apply`` one event at a time, or ``fold`` a list."""

    run_id: str = ""
    run_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "idle"  # idle, running, finished, cancelled, failed
    phase: str = ""
    phase_label: str = ""
    block: int | None = None
    total_blocks: int = 0
    train_label: str = ""  # the label whose steps are being plotted (ebft)
    steps: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # block -> [(step, loss)]
    # learned masks (ebft-mask): block -> [(step, fraction of the block's masked weights flipped by the step)]
    mask_changes: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    model_steps: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # lora: [(step, LM loss)]
    zeroshot: dict[str, dict[str, dict]] = field(default_factory=dict)  # label -> task -> {acc, acc_norm}
    initial: dict[int, float] = field(default_factory=dict)
    final: dict[int, float] = field(default_factory=dict)
    ppl: dict[str, float] = field(default_factory=dict)
    eval_info: EvalInfo | None = None  # from the last evaluation, completed by the summary at the end
    sparsity: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # label -> block -> layer
    notices: list[tuple[str, str]] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    block_seconds: list[float] = field(default_factory=list)  # of the current phase, for the time-left guess
    summary: RunSummary | None = None  # once the run finished (RunFinished)
    events: int = 0

    def apply(self, event: Event) -> RunView:
        self.events += 1
        handler = _APPLY.get(type(event))
        if handler is not None:
            handler(self, event)
        return self

    # ---- one method per kind of event (see _APPLY) ---------------------------------------------------------
    def _run_started(self, event: RunStarted) -> None:
        self.run_id, self.run_dir, self.config, self.status = event.run_id, event.run_dir, event.config, "running"

    def _phase_started(self, event: PhaseStarted) -> None:
        self.phase, self.phase_label, self.block, self.block_seconds = event.phase, event.label, None, []

    def _phase_finished(self, event: PhaseFinished) -> None:
        key = f"{event.phase}:{event.label}" if event.label else event.phase
        self.phase_seconds[key] = event.seconds

    def _block_started(self, event: BlockStarted) -> None:
        self.block, self.total_blocks = event.block, event.total

    def _step_loss(self, event: StepLoss) -> None:
        if event.block < 0:  # LoRA trains the whole model: its own curve
            self.model_steps.setdefault(event.label, []).append((event.step, event.loss))
            return
        if event.label != self.train_label:
            self.train_label, self.steps, self.initial, self.final = event.label, {}, {}, {}
            self.mask_changes = {}
        if event.step == 1:  # a block trained again (a resumed run redoes the block it stopped in)
            self.steps[event.block] = []
            self.mask_changes.pop(event.block, None)
        self.steps.setdefault(event.block, []).append((event.step, event.loss))
        if event.mask_change is not None:
            self.mask_changes.setdefault(event.block, []).append((event.step, event.mask_change))

    def _block_finished(self, event: BlockFinished) -> None:
        self.block_seconds.append(event.seconds)
        if event.layers:
            self.sparsity.setdefault(event.label, {})[event.block] = dict(event.layers)
        if event.initial_loss is not None:
            self.train_label = event.label
            self.initial[event.block] = event.initial_loss
            if event.final_loss is not None:
                self.final[event.block] = event.final_loss

    def _eval_finished(self, event: EvalFinished) -> None:
        self.ppl[event.label] = event.ppl
        self.eval_info = EvalInfo(source=event.source, seqlen=event.seqlen, windows=event.windows,
                                  tokens=event.tokens, partial=event.partial)

    def _zeroshot_finished(self, event: ZeroShotFinished) -> None:
        self.zeroshot[event.label] = dict(event.results)

    def _notice(self, event: Notice) -> None:
        self.notices.append((event.level, event.text))

    def _run_finished(self, event: RunFinished) -> None:
        self.status, self.summary = event.status, RunSummary.from_dict(event.summary)
        if self.summary.eval is not None:  # the description and the windows the text holds
            self.eval_info = (self.eval_info or EvalInfo()).merged(self.summary.eval)

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def progress(self) -> str:
        """One line: phase, block k of N, a time-left guess for the phase."""
        if self.status != "running":
            return self.status
        text = self.phase if self.phase_label in ("", self.phase) else f"{self.phase} {self.phase_label}"
        if self.phase == "lora" and self.model_steps.get(self.phase_label):
            step, loss = self.model_steps[self.phase_label][-1]
            text += f": step {step}, language-model loss {loss:.3f}"
        if self.block is not None and self.total_blocks:
            text += f": block {self.block + 1} of {self.total_blocks}"
            if self.block_seconds:
                left = sum(self.block_seconds) / len(self.block_seconds) * (self.total_blocks - len(self.block_seconds))
                text += f", about {_duration(left)} left in this phase"
        return text

    @property
    def errors(self) -> list[str]:
        return [text for level, text in self.notices if level == "error"]


# What each kind of event does to the view (the engine's event classes are final: looked up by exact type).
_APPLY = {RunStarted: RunView._run_started, PhaseStarted: RunView._phase_started,
          PhaseFinished: RunView._phase_finished, BlockStarted: RunView._block_started, StepLoss: RunView._step_loss,
          BlockFinished: RunView._block_finished, EvalFinished: RunView._eval_finished,
          ZeroShotFinished: RunView._zeroshot_finished, Notice: RunView._notice, RunFinished: RunView._run_finished}


def fold(events: Iterable[Event]) -> RunView:
    view = RunView()
    for event in events:
        view.apply(event)
    return view


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Throttle:
    """Lets an update through at most every ``interval`` seconds, or when forced."""

    def __init__(self, interval: float = 0.4):
        self.interval, self.last = interval, 0.0

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            return True
        return False
