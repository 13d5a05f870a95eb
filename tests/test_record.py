"""The run folder's order: runs list newest first by when they started, even within one second."""
from __future__ import annotations

import time

from ebft_engine.events import RunStarted
from ebft_engine.record import RunRecord, run_folders, started_at


def _second(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y%m%d-%H%M%S"))


def _make_run(runs, run_id: str, started: float | None, events: str | None = None) -> RunRecord:
    """A run folder as the engine leaves it: config.json, and events.jsonl opening with RunStarted at ``started``
    (or holding ``events`` verbatim, e.g. a torn line)."""
    record = RunRecord(runs, run_id)
    record.write_config({"model": "tiny-random"})
    if started is not None:
        record.append(RunStarted(run_id=run_id, run_dir=str(record.dir), config={}, time=started))
    if events is not None:
        (record.dir / "events.jsonl").write_text(events, encoding="utf-8")
    return record


def test_two_runs_started_within_one_second_list_newest_first(tmp_path):
    # same second, random suffixes in the opposite order: sorting by name lists the older run first
    second = _second("20261129-120000")
    older = _make_run(tmp_path, "20261129-120000-f00000", second + 0.2)
    newer = _make_run(tmp_path, "20261129-120000-0fffff", second + 0.7)
    assert run_folders(tmp_path) == [newer.dir, older.dir]
    # resuming the older run appends a second RunStarted: it keeps its place, the time it first started
    older.append(RunStarted(run_id=older.dir.name, run_dir=str(older.dir), config={}, time=second + 60,
                            resumed=True))
    assert started_at(older.dir) == second + 0.2
    assert run_folders(tmp_path) == [newer.dir, older.dir]


def test_a_folder_without_a_readable_start_lists_by_the_second_its_id_names(tmp_path):
    first = _make_run(tmp_path, "20261129-115958-aaaaaa", _second("20261129-115958") + 0.5)
    torn = _make_run(tmp_path, "20261129-120000-bbbbbb", None, events='{"run_id": "20261129-1200')
    last = _make_run(tmp_path, "20261129-120001-cccccc", _second("20261129-120001") + 0.5)
    (tmp_path / "not-a-run").mkdir()  # no config.json: not listed
    assert started_at(torn.dir) == _second("20261129-120000")
    assert run_folders(tmp_path) == [last.dir, torn.dir, first.dir]
    assert run_folders(tmp_path / "missing") == []


def test_ids_from_one_process_increase_even_on_a_clock_that_stands_still(monkeypatch):
    import re

    from ebft_engine import record

    ids = [record.new_run_id() for _ in range(300)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"\d{8}-\d{6}-\d{3}[0-9a-f]{3}", i) for i in ids)  # still YYYYMMDD-HHMMSS-xxxxxx
    now = int(_second("20261129-120000") * 1e9) + 100_000_000
    monkeypatch.setattr(record, "_last_ms", 0)
    monkeypatch.setattr(record.time, "time_ns", lambda: now)
    frozen = [record.new_run_id() for _ in range(3)]
    assert [i[:19] for i in frozen] == ["20261129-120000-100", "20261129-120000-101", "20261129-120000-102"]


def test_json_out_of_an_unfinished_run_keeps_another_runs_finished_summary(tmp_path):
    """--json-out never loses a finished result: a failed or cancelled run does not overwrite another run's
    finished summary there (its own stays in its folder); a finished run, or the same run, does."""
    import json

    from ebft_engine.runner import Run

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"run_id": "a", "status": "finished", "ppl": {"dense": 12.5}}))
    note = Run._write_json_out(path, {"run_id": "b", "status": "failed", "ppl": {}})
    assert note is not None and "run a's finished summary: kept it" in note
    assert json.loads(path.read_text())["run_id"] == "a"
    assert Run._write_json_out(path, {"run_id": "a", "status": "cancelled", "ppl": {}}) is None  # the same run
    assert json.loads(path.read_text())["status"] == "cancelled"
    path.write_text(json.dumps({"run_id": "a", "status": "finished", "ppl": {"dense": 12.5}}))
    assert Run._write_json_out(path, {"run_id": "b", "status": "finished", "ppl": {}}) is None
    assert json.loads(path.read_text())["run_id"] == "b"
    (tmp_path / "other.json").write_text("not json")  # not a summary: nothing to keep
    assert Run._write_json_out(tmp_path / "other.json", {"run_id": "b", "status": "failed"}) is None
