"""The run folder: ``runs/<id>/`` with config.json, events.jsonl, blocks.csv and summary.json.

JSON files are written to a temporary file and renamed, so a reader never sees half a file; events are
appended one line at a time and :func:`read_events` skips a torn last line. Every file is strict JSON: a value
that is not finite (a NaN loss, an infinite reconstruction error) is written as null, never as NaN.
:func:`run_folders` lists a runs directory newest first, by when each run started: the one order for
everything that shows or picks past runs.
"""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .events import BlockFinished, Event, event_from_dict, event_to_dict
from .summary import RunSummary

BLOCK_COLUMNS = ("label", "block", "initial_loss", "final_loss", "seconds", "sparsity")


_RUN_ID = re.compile(r"(\d{8}-\d{6})-[0-9a-f]{6}")  # YYYYMMDD-HHMMSS (local time) and six hex digits


_last_ms = 0  # the millisecond of the last id this process handed out
_ids = threading.Lock()


def new_run_id() -> str:
    """A new run's folder name, YYYYMMDD-HHMMSS-mmmxxx: the local time it starts, the millisecond (mmm), and three
    random hex digits (xxx) against a clash with another process. Ids from one process increase even within one
    millisecond, so runs started within one second also sort by name in the order they started (ids written
    before this had six random hex digits after the second: :func:`run_folders` orders both kinds)."""
    global _last_ms
    with _ids:
        ms = _last_ms = max(time.time_ns() // 1_000_000, _last_ms + 1)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(ms // 1000))
    return f"{stamp}-{ms % 1000:03d}{secrets.randbelow(16 ** 3):03x}"


def started_at(run_dir: str | Path) -> float:
    """When a run started, in seconds since the epoch: the time of its first event (RunStarted; a resumed run
    appends a second one and keeps its first). For a folder whose events.jsonl cannot be read, the second its
    id names; 0.0 for a folder with neither."""
    run_dir = Path(run_dir)
    try:
        with open(run_dir / "events.jsonl", encoding="utf-8", errors="replace") as f:
            first = json.loads(f.readline())
        if first.get("kind") == "run_started" and isinstance(first.get("time"), (int, float)):
            return float(first["time"])
    except (OSError, ValueError, AttributeError):
        pass
    named = _RUN_ID.fullmatch(run_dir.name)
    if named:
        try:
            return time.mktime(time.strptime(named.group(1), "%Y%m%d-%H%M%S"))
        except (ValueError, OverflowError):
            pass
    return 0.0


def run_folders(runs_dir: str | Path) -> list[Path]:
    """The run folders (those with a config.json) under ``runs_dir``, newest first: by the time each run
    started, then by id. Not by id alone: older ids name their start to the second only (runs started within one
    second came out in the order of their random suffixes), and an id's local time goes back when clocks do."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    folders = [f for f in root.iterdir() if not f.name.startswith(".") and (f / "config.json").is_file()]
    return sorted(folders, key=lambda f: (started_at(f), f.name), reverse=True)


def finite(data: Any) -> Any:
    """``data`` with every float that is not finite replaced by None, in nested dicts, lists and tuples."""
    if isinstance(data, bool) or isinstance(data, numbers.Integral):
        return data
    if isinstance(data, numbers.Real):
        return float(data) if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def to_json(data: Any, **kwargs) -> str:
    """Strict JSON (no NaN or Infinity tokens, which JSON does not have): non-finite floats become null."""
    return json.dumps(finite(data), allow_nan=False, default=str, **kwargs)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


class RunRecord:
    """Writes one run's folder as its events pass by."""

    def __init__(self, runs_dir: str | Path, run_id: str, reopen: bool = False):
        self.dir = Path(runs_dir) / run_id
        try:
            self.dir.mkdir(parents=True, exist_ok=reopen)
            probe = self.dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError("runs_dir", f"cannot write run records under {str(runs_dir)!r} ({e.strerror})",
                              "choose a writable folder with --runs-dir") from None
        self._events = open(self.dir / "events.jsonl", "a", encoding="utf-8")
        self._blocks: list[dict[str, Any]] = _read_blocks(self.dir / "blocks.csv") if reopen else []

    @classmethod
    def reopen(cls, run_dir: str | Path) -> "RunRecord":
        """The record of an earlier run, to continue: events are appended, blocks.csv extended."""
        run_dir = Path(run_dir)
        return cls(run_dir.parent, run_dir.name, reopen=True)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.dir / "config.json", config)

    def append(self, event: Event) -> None:
        self._events.write(to_json(event_to_dict(event)) + "\n")
        self._events.flush()
        if isinstance(event, BlockFinished):
            key = (event.label, str(event.block))  # a resumed run redoes the block it was killed in
            self._blocks = [r for r in self._blocks if (r["label"], str(r["block"])) != key]
            self._blocks.append({k: getattr(event, k) for k in BLOCK_COLUMNS})
            self._write_blocks()

    def _write_blocks(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=BLOCK_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._blocks)
        tmp = self.dir / "blocks.csv.tmp"
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, self.dir / "blocks.csv")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.dir / "summary.json", summary)

    def close(self) -> None:
        self._events.close()


def _read_blocks(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """A run folder's summary.json as the dict it holds; None when it is missing or unreadable."""
    return _read_json_dict(Path(run_dir) / "summary.json")


def load_summary_file(path: str | Path) -> RunSummary | None:
    """Any summary file (e.g. a --json-out copy) as a RunSummary; None when it is missing or not a summary."""
    data = _read_json_dict(Path(path))
    return None if data is None or "run_id" not in data else RunSummary.from_dict(data)


def _read_json_dict(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_summary(run_dir: str | Path) -> RunSummary | None:
    """A run folder's summary.json as a RunSummary (read tolerantly, whatever its age); None when it is missing
    or unreadable."""
    summary = read_summary(run_dir)
    return None if summary is None else RunSummary.from_dict(summary)


def run_status(run_dir: str | Path) -> str:
    """finished, cancelled, failed, running, or interrupted (a run that died without finishing its record)."""
    return status_of(read_summary(run_dir))


def status_of(summary: RunSummary | Mapping[str, Any] | None) -> str:
    """The status a summary records (a RunSummary, or summary.json's dict), with a 'running' one whose process is
    gone read as interrupted; no summary, or one without a status, is interrupted too."""
    if not isinstance(summary, RunSummary):
        summary = RunSummary.from_dict(summary)
    if summary.status == "running" and not _alive(summary.pid):
        return "interrupted"
    return summary.status


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_events(run_dir: str | Path) -> list[Event]:
    """All events of a run folder; a torn or unreadable line (a crash mid-write) is skipped."""
    events = []
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        return events
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            events.append(event_from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return events
