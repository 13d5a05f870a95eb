"""Running an experiment: ``run(config)`` and ``resume(run_dir)`` are generators of events (events.py) whose
last is always RunFinished with the summary. The order of work is ``runner.Run.execute``; the block loop is
``loop.block_loop``; what a run may be refused before it starts is ``checks.py``.

One block at a time sits on the device; the model and the calibration activations stay in host memory.
The dense weights are loaded once: when a run compares several variants, the dense block weights are kept
in memory and restored before each variant instead of being read from disk again.
"""
from __future__ import annotations

import contextlib
import json
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from .checks import DEFAULT_EVAL_SEQLEN_CAP, check_against_model, preflight
from .config import RunConfig
from .errors import Cancelled, ConfigError, EbftError
from .events import Event, Notice, RunFinished, RunStarted
from .identity import check_same_model, model_identity, read_identity
from .models import load_config, resolve_source
from .remedies import is_out_of_memory
from .record import RunRecord, new_run_id, read_summary, status_of
from .runner import Run
from .summary import RunError
from .sparsity.owl import OWL_BOUNDS, owl_sparsities, owl_spread

__all__ = ["DEFAULT_EVAL_SEQLEN_CAP", "OWL_BOUNDS", "check_against_model", "owl_sparsities", "owl_spread",
           "preflight", "resumable", "resume", "run"]


def _predicate(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return cancel.is_set
    return cancel


def run(config: RunConfig, cancel: threading.Event | Callable[[], bool] | None = None) -> Iterator[Event]:
    """Run one experiment and yield its events; the last one is always RunFinished with the summary.

    Args:
        config: the validated run configuration.
        cancel: a threading.Event (or a callable returning True) that stops the run between steps; the
            partial summary is still written, with status ``cancelled``, and the run can be resumed.

    Raises:
        EbftError: before any event and before a run folder exists, for what :func:`checks.preflight` refuses
            (ConfigError, ModelLoadError, DataError), or if the run folder cannot be written.
    """
    preflight(config)
    record = RunRecord(config.runs_dir, new_run_id())
    yield from _drive(Run(config, record, _predicate(cancel)), resumed=False)


# What a resumed run may change: how the remaining blocks fit in memory, not what they compute from.
RESUME_OVERRIDES = ("ebft.batch_size", "activations")
# ... and where its output goes besides its own folder (nothing it computes depends on these).
OUTPUT_OVERRIDES = ("json_out",)


def resume(run_dir: str | Path, cancel: threading.Event | Callable[[], bool] | None = None,
           overrides: dict[str, Any] | None = None) -> Iterator[Event]:
    """Continue a run that was killed, cancelled or failed, in its own folder, from its last finished block.

    Finished perplexities are kept, blocks already checkpointed are restored instead of redone, and the run
    ends with the same masks and perplexities as one that was never interrupted.

    Args:
        overrides: after an out-of-memory failure, a smaller ``ebft.batch_size`` or ``activations: host`` for
            the blocks still to do (RESUME_OVERRIDES), and ``json_out``, where the finished summary is also
            written (OUTPUT_OVERRIDES); nothing else can change mid-run.

    Raises:
        ConfigError: before any event, if the folder is not a resumable run (finished, still running, or not a
            run folder at all), or an override is not allowed.
    """
    config, previous = resumable(run_dir)
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in changes:
        if key not in RESUME_OVERRIDES + OUTPUT_OVERRIDES:
            raise ConfigError(key, "cannot change when resuming (the finished blocks were computed with it)",
                              "resume with the run's own settings, changing at most "
                              f"{', '.join(RESUME_OVERRIDES + OUTPUT_OVERRIDES)}")
    if changes:
        config = config.with_overrides(changes)
    record = RunRecord.reopen(run_dir)
    computing = {k: v for k, v in changes.items() if k in RESUME_OVERRIDES}
    note = Notice("warning", "resumed with " + ", ".join(f"{k}={v}" for k, v in computing.items()) +
                  " for the blocks still to do") if computing else None
    yield from _drive(Run(config, record, _predicate(cancel), previous=previous), resumed=True, note=note)


def resumable(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any] | None]:
    """(config, previous summary) of a run folder that can be resumed; else ConfigError saying why."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError("resume", f"{str(run_dir)!r} is not a run folder (it has no config.json)",
                          "pass a folder under your runs directory, e.g. runs/20261128-101500-417c2e")
    summary = read_summary(run_dir)
    status = status_of(summary)
    if status == "finished":
        raise ConfigError("resume", f"run {run_dir.name} already finished", "start a new run instead")
    if status == "running":
        raise ConfigError("resume", f"run {run_dir.name} is still running (process {summary.get('pid')})",
                          "stop it first (Ctrl-C or Stop), then resume")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("resume", f"cannot read {config_file} ({e})", "the folder cannot be resumed; start a "
                          "new run with the same settings") from None
    config = RunConfig.from_dict(data)
    if read_identity(run_dir) is not None:  # the model the run started on, against the one there now
        try:
            source = resolve_source(config.model)
            current = model_identity(source, load_config(source))
        except (EbftError, OSError):  # it cannot be read now: loading it will say why
            current = None
        if current is not None:
            check_same_model(run_dir, current)
    return config, summary


def _drive(state: Run, resumed: bool, note: Notice | None = None) -> Iterator[Event]:
    record = state.record
    status = "failed"
    try:
        yield state.emit(RunStarted(run_id=record.dir.name, run_dir=str(record.dir), config=state.config.to_dict(),
                                    resumed=resumed))
        if note is not None:
            yield state.emit(note)
        yield from _emitted(state.execute(), state.emit)
        status = "finished"
    except (Cancelled, KeyboardInterrupt):
        status = "cancelled"
        yield state.emit(Notice("warning", "run cancelled; the partial results are kept in " + str(record.dir) +
                                f" (continue it with: python -m ebft_engine run --resume {record.dir})"))
    except GeneratorExit:  # the consumer stopped listening: record what we have, yield nothing more
        state.finish("cancelled")
        raise
    except EbftError as e:
        state.summary.error = RunError(getattr(e, "field", None), str(e))
        yield state.emit(Notice("error", str(e)))
    except Exception as e:  # a bug or a torch failure: keep the traceback in the run folder, say it plainly
        if is_out_of_memory(e):  # torch's OutOfMemoryError, or a cuBLAS/cuSOLVER allocation failure
            state.release()
            yield state.emit(Notice("error", state.out_of_memory()))
        else:
            (record.dir / "traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
            yield state.emit(Notice("error", f"internal error ({e.__class__.__name__}: {str(e)[:300]}); "
                                             f"details in {record.dir / 'traceback.txt'}"))
    state.release()
    summary = state.finish(status)
    if state.json_out_note:
        yield state.emit(Notice("warning", state.json_out_note))
    yield state.emit(RunFinished(status=status, summary=summary))
    record.close()


def _emitted(events: Iterator[Event], emit: Callable[[Event], Event]) -> Iterator[Event]:
    """Each event of ``events`` recorded by ``emit`` as it passes; closed with the consumer, so a stopped run's
    inner ``finally`` clauses (blocks back on the host) run at once."""
    with contextlib.closing(events):
        for event in events:
            yield emit(event)
