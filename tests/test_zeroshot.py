"""Zero-shot accuracy through lm-eval, in-process on the model in memory, with a small local task."""
from __future__ import annotations

import json

import pytest

from ebft_engine import phases, run, zeroshot

QUESTIONS = [("The sky is", [" blue", " banana"], 0), ("Fire is", [" cold", " hot"], 1),
             ("Water is", [" wet", " dry"], 0), ("Ice is", [" warm", " cold"], 1), ("Grass is", [" green", " loud"], 0)]


def _task(folder, name, data_file):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "tiny_qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    _task(tmp_path / "tasks", "tiny_qa", data)
    _task(tmp_path / "tasks", "gone_qa", tmp_path / "nowhere.jsonl")
    return tmp_path / "tasks"


def test_every_model_gets_acc_and_acc_norm(tiny_run_config, local_task):
    config = tiny_run_config.with_overrides({"eval.zeroshot": "tiny_qa", "eval.zeroshot_include": str(local_task),
                                             "baselines": "wanda"})
    events = list(run(config))
    summary = events[-1].summary
    assert summary["status"] == "finished", [e for e in events if e.kind == "notice"]
    assert list(summary["zeroshot"]) == ["dense", "wanda", "ebft"]
    for label, results in summary["zeroshot"].items():
        r = results["tiny_qa"]
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and r["examples"] == len(QUESTIONS)
        assert r["acc"] * len(QUESTIONS) == pytest.approx(round(r["acc"] * len(QUESTIONS)))  # a count of answers
    assert [e.label for e in events if e.kind == "zeroshot_finished"] == ["dense", "wanda", "ebft"]


def test_missing_and_unknown_tasks_are_named_before_any_pruning(tiny_run_config, local_task):
    config = tiny_run_config.with_overrides({"eval.zeroshot": "tiny_qa,gone_qa",
                                             "eval.zeroshot_include": str(local_task)})
    events = list(run(config))
    assert events[-1].status == "failed"
    (error,) = [e.text for e in events if e.kind == "notice" and e.level == "error"]
    assert error.startswith("eval.zeroshot: no local copy of gone_qa") and "tiny_qa" not in error
    assert not any(e.kind == "phase_started" and e.phase in ("eval", "prune", "ebft") for e in events)
    unknown = list(run(config.with_overrides({"eval.zeroshot": "boolqq"})))
    (error,) = [e.text for e in unknown if e.kind == "notice" and e.level == "error"]
    assert "unknown lm-eval task 'boolqq'" in error


def test_a_device_too_small_for_the_model_streams_its_blocks_and_every_number_stays(tiny_run_config, local_task,
                                                                                    monkeypatch):
    """A device that cannot take the whole model beside lm-eval's batch (1 MiB here; the CPU stands in for it)
    gets the blocks streamed from host memory: the accuracies are the plain run's, and so is every perplexity
    measured after a zero-shot phase, the model having come back as it was."""
    config = tiny_run_config.with_overrides({"eval.zeroshot": "tiny_qa", "eval.zeroshot_include": str(local_task)})
    plain = list(run(config))[-1].summary
    monkeypatch.setattr(phases, "capacities", lambda device: (1024 ** 2, None))
    modes, placed = [], zeroshot.placed

    def spy(model, blocks, device, *, offload):
        modes.append(offload)
        return placed(model, blocks, device, offload=offload)

    monkeypatch.setattr(zeroshot, "placed", spy)
    events = list(run(config))
    streamed = events[-1].summary
    assert streamed["status"] == "finished", [e for e in events if e.kind == "notice"]
    (note,) = [e.text for e in events if e.kind == "notice" and e.text.startswith("zero-shot:")]
    assert "do not fit the device's 0.00 GiB: its blocks stay in host memory" in note
    assert list(streamed["zeroshot"]) == ["dense", "ebft"] and streamed["zeroshot"] == plain["zeroshot"]
    assert modes == [True, True] and streamed["ppl"] == plain["ppl"]
