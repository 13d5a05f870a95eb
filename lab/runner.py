"""The handlers behind Run, Step, Stop, Resume, Memory plan and Download config: they drive the engine and stream
the results column (lab/panels/results.py). The handlers that read the setup are SetupHandlers' methods: they
take Gradio's ``{component: value}`` of the config controls, never a list of positional values."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import spaces
import yaml
from gradio.components import Component

from ebft_engine import ConfigError, EbftError, RunConfig, resume, run
from ebft_engine.events import BlockFinished, EvalFinished, Event, RunFinished

from . import policy, tables
from .controls import Controls
from .panels.actions import THIS_MACHINE
from .panels.results import results_for
from .policy import ZERO_GPU_SECONDS  # the slot a run within the Space's bounds fits (lab/policy.py)
from .state import RunView, Throttle

_cancel: dict[str, threading.Event] = {}  # session -> its Stop flag (never the model: that stays in the engine)
_lock = threading.Lock()
# Step mode, for a classroom: each click runs until the next block is finished, then the run waits in this
# per-session registry until the next click (or Stop, or a new run): as the engine's suspended generator, or on
# ZeroGPU as None, the run then waiting in its folder (see SetupHandlers.step_run).
_steppers: dict[str, tuple[Iterator[Event] | None, RunView]] = {}


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


@dataclass(frozen=True)
class Refused:
    """An EbftError raised before a run's first event (preflight: a setting the model rules out, a model or a file
    not found, a runs folder that cannot be written), as a value the GPU job yields instead. On ZeroGPU the job
    runs in a worker process, and an exception raised there reaches the host only as its class name (spaces raises
    a generic "ZeroGPU worker error" in its place); a yielded value is pickled whole, sentence and all."""

    sentence: str


def _refusals(events: Iterator[Event]) -> Iterator[Event | Refused]:
    """Worker side: ``events``, with the EbftError the engine raises before its first event yielded as Refused
    (after the first event the engine reports every error as events itself)."""
    try:
        yield from events
    except EbftError as e:
        yield Refused(str(e))


def _engine(events: Iterator[Event | Refused]) -> Iterator[Event]:
    """Host side: a GPU job's events, a Refused raised again as the EbftError it was."""
    for event in events:
        if isinstance(event, Refused):
            raise EbftError(event.sentence)
        yield event


def _sentence(error: Exception) -> str:
    """The engine's sentence, or a gr.Error's: ZeroGPU's own (no GPU quota left, a slot that ran out) with its
    title."""
    title = getattr(error, "title", "Error")
    return str(error) if title in ("", "Error") else f"{title}: {error}"


def _failed(error: EbftError) -> tuple:
    return results_for(RunView(status="failed", notices=[("error", str(error))]))


def _stream(start, view: RunView, session: str):
    """Drive one engine run for a session: a few updates a second, then the final state with the record."""
    cancel = threading.Event()
    with _lock:
        _cancel[session] = cancel
    throttle = Throttle(0.4)
    try:
        # an Event cannot cross to a ZeroGPU worker
        for event in _engine(start(None if policy.on_zero_gpu() else cancel)):
            view.apply(event)
            force = isinstance(event, (BlockFinished, EvalFinished, RunFinished))
            if throttle.ready(force):
                yield results_for(view)
    except (EbftError, gr.Error) as e:  # refused before it started (e.g. the model rules out a setting)
        view.status = "failed"
        view.notices.append(("error", _sentence(e)))
    finally:
        with _lock:
            if _cancel.get(session) is cancel:
                del _cancel[session]
    yield results_for(view, _archive(view.run_dir))


def resume_run(run_name: str | None, request: gr.Request):
    """Generator behind History's Resume: continue an interrupted, cancelled or failed run from its last finished
    block, showing its earlier curves and numbers first. Takes a run's name from the list, never a path."""
    try:
        run_dir = _run_folder(run_name)
        view = tables.load_view(run_dir)  # what the run showed before it stopped
    except EbftError as e:
        yield _failed(e)
        return
    view.status, view.summary = "running", None
    _close_paused_steppers()
    yield from _stream(lambda cancel: engine_resume(str(run_dir), cancel), view, _session(request))


def _run_folder(run_name: str | None) -> Path:
    names = set(tables.list_runs(policy.runs_dir())["run"])
    if not run_name or run_name not in names:
        raise ConfigError("resume", f"{run_name!r} is not a run in the history", "choose one from the list")
    return Path(policy.runs_dir()) / run_name


@spaces.GPU(duration=ZERO_GPU_SECONDS)
def engine_events(config: RunConfig, cancel: threading.Event | None = None):
    """The whole GPU job (load, prune, EBFT, evaluate) as one generator of events.

    On ZeroGPU a GPU exists only inside a call decorated with ``spaces.GPU``, run in a worker process: so the job
    is one decorated generator that yields plain CPU-side events. Everywhere else the decorator does nothing.
    An error raised before the first event comes as a Refused value (the host's _engine raises it again).
    """
    yield from _refusals(run(config, cancel))


@spaces.GPU(duration=ZERO_GPU_SECONDS)
def engine_resume(run_dir: str, cancel: threading.Event | None = None):
    """The GPU job of a resumed run (see engine_events)."""
    yield from _refusals(resume(run_dir, cancel))


@spaces.GPU(duration=ZERO_GPU_SECONDS)
def engine_step(config: RunConfig | None = None, run_dir: str | None = None):
    """One Step click on ZeroGPU, as its own GPU call: start the run (``config``) or resume it from its folder
    (``run_dir``), up to its next finished block, then end. Closing the engine's generator there records the run
    as cancelled with that block checkpointed, so the next click's call resumes it after it."""
    steps = _refusals(run(config) if run_dir is None else resume(run_dir))
    with contextlib.closing(steps):
        for event in steps:
            yield event
            if isinstance(event, BlockFinished):
                return


def stop_run(request: gr.Request) -> str:
    session = _session(request)
    with _lock:
        flag = _cancel.get(session)
        stepper = _steppers.pop(session, None)
    if stepper is not None:  # a paused step-mode run: close it, which records it as cancelled
        if stepper[0] is not None:  # (on ZeroGPU it already is, in its folder)
            stepper[0].close()
        return "Step-by-step run stopped."
    if flag is None:
        return "Nothing is running."
    flag.set()
    return "Stopping after the current step…"


def _close_paused_steppers() -> None:
    """A new run takes the one loaded model: paused step-by-step runs cannot go on, so they end as cancelled."""
    with _lock:
        paused = list(_steppers.values())
        _steppers.clear()
    for events, _view in paused:
        if events is not None:  # on ZeroGPU the run already stopped in its folder, recorded as cancelled
            events.close()


def _archive(run_dir: str) -> str | None:
    """The run folder as a zip for download."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    target = Path(tempfile.mkdtemp(prefix="ebft-run-")) / Path(run_dir).name
    return shutil.make_archive(str(target), "zip", run_dir)


class SetupHandlers:
    """The handlers that read the setup column. Gradio gives each one ``{component: value}`` of the page's config
    controls (``controls.inputs``); the page's :class:`Controls` map that back to config fields. Bound methods, so
    that Gradio still sees their ``gr.Request`` parameter (a functools.partial hides it)."""

    def __init__(self, controls: Controls, plan_card: Component):
        self.controls, self.plan_card = controls, plan_card

    def start_run(self, values: dict[Component, Any], request: gr.Request):
        """Generator behind Run: streams a few updates a second while the engine works, and the final state.
        ``request`` identifies the browser session, so Stop stops only it."""
        try:
            config = self.controls.config(values)
        except EbftError as e:
            yield _failed(e)
            return
        _close_paused_steppers()
        yield from _stream(lambda cancel: engine_events(config, cancel), RunView(), _session(request))

    def step_run(self, values: dict[Component, Any], request: gr.Request):
        """Generator behind Step: the first click starts a run; every click advances it by one block.

        On a workstation the run is one engine generator, parked in _steppers between clicks with its model
        loaded. That cannot work on ZeroGPU: the GPU exists only inside a ``spaces.GPU`` call, run in a worker
        process that is released (or serves another visitor) when the call returns, so a generator suspended there
        is gone by the next click, and the host process has no GPU to run the engine itself. There each click is
        its own GPU call (engine_step): the first starts the run, each later one resumes it from the checkpoint
        the engine writes after every block (pipeline.resume: the model reloaded, the finished blocks restored and
        their outputs recomputed, the same numbers as one uninterrupted run), and the host keeps only the run's
        view, whose run_dir names the folder. A click costs a model load more; a hidden Step would cost the
        classroom its mode.
        """
        session = _session(request)
        with _lock:
            stepper = _steppers.pop(session, None)
        if stepper is None:
            _close_paused_steppers()
            try:
                config = self.controls.config(values)
            except EbftError as e:
                yield _failed(e)
                return
            events = engine_step(config) if policy.on_zero_gpu() else engine_events(config)
            stepper = _engine(events), RunView()
        elif stepper[0] is None:  # ZeroGPU: the run waits in its folder
            stepper = _engine(engine_step(run_dir=stepper[1].run_dir)), stepper[1]
        yield from _step(*stepper, session)

    def plan_run(self, values: dict[Component, Any]) -> str:
        """The memory planner's prediction for the current settings, before anything is loaded: on this machine,
        or on the card chosen beside the button (the same card list as ``python -m ebft_engine plan --gpu``)."""
        try:
            return plan_text_for(self.controls.config(values), values.get(self.plan_card, THIS_MACHINE))
        except EbftError as e:
            return f"⚠️ {e}"

    def export_yaml(self, values: dict[Component, Any]) -> tuple[str | None, str]:
        try:
            config = self.controls.config(values)
        except EbftError as e:
            return None, f"⚠️ {e}"
        path = Path(tempfile.mkdtemp(prefix="ebft-config-")) / "ebft-config.yaml"
        data = config.to_dict()
        data.pop("runs_dir", None)
        path.write_text("# python -m ebft_engine run --config ebft-config.yaml\n"
                        + yaml.safe_dump(data, sort_keys=False))
        return str(path), "Reproduce it with `python -m ebft_engine run --config ebft-config.yaml`."


def _step(events: Iterator[Event], view: RunView, session: str):
    """Advance a step-mode run to its next finished block (then park it in _steppers), or to its end. On ZeroGPU
    ``events`` is one click's GPU call, which ends after that block (engine_step); it is read to its end, so the
    call returns its GPU, and the run is parked as None (it waits in its folder)."""
    zero_gpu, throttle, done = policy.on_zero_gpu(), Throttle(0.4), None
    try:
        for event in events:
            view.apply(event)
            if isinstance(event, BlockFinished):
                done = event
                if not zero_gpu:
                    break  # the engine's generator waits here for the next click
            elif throttle.ready(isinstance(event, EvalFinished)):
                yield results_for(view)
    except (EbftError, gr.Error) as e:  # refused before its first event (see _stream)
        view.status, done = "failed", None
        view.notices.append(("error", _sentence(e)))
    if done is not None and view.status == "running":
        with _lock:
            _steppers[session] = (None if zero_gpu else events, view)
        note = f"block {done.block + 1} of {done.total} done ({done.label}); press Step for the next"
        yield results_for(view, status=f"**paused** — {note}")
        return
    yield results_for(view, _archive(view.run_dir))


def plan_text_for(config: RunConfig, card: str) -> str:
    """The memory plan of ``config`` on a named card, or on this machine; raises EbftError."""
    from ebft_engine.cards import CARDS, model_shape, plan_text
    from ebft_engine.device import pick_device, pick_precision
    from ebft_engine.models import count_params, resolve_source, restores_from_files
    from ebft_engine.planner import capacities, plan_memory
    from ebft_engine.remedies import remedy

    if card in CARDS:
        text, _fits = plan_text(config, CARDS[card])
        return f"```\n{text}\n```"
    source = resolve_source(config.model)
    model_config, shipped = model_shape(source)  # a preset's hub id: the shape shipped with the lab, no network
    device = pick_device(config.device)
    precision = pick_precision(device, config.dtype, count_params(model_config))
    device_capacity, host_capacity = capacities(device)
    plan = plan_memory(model_config, config, precision, device_capacity=device_capacity,
                       host_capacity=host_capacity, gguf=source.gguf_file is not None,
                       from_files=restores_from_files(source))  # as the run plans it (phases._plan)
    verdict = "fits" if plan.fits else (f"**does not fit**: {plan.problem}; "
                                        f"{remedy(plan, model_config, config, precision)}")
    shape = f" (the model's shape from {shipped})" if shipped else ""
    return f"{plan.summary()}{shape} — {verdict}.\n\n{plan.table()}"
