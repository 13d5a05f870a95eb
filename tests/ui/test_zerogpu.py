"""The lab on a ZeroGPU Space, without a GPU (tests/ui/conftest.py's ``zero_gpu``: every GPU job in a fresh forked
worker, values pickled across, the engine refused in the host process): Step is one GPU call per click and ends
with the numbers of one uninterrupted run; an error raised before a run's first event reaches the page's status
as the engine's own sentence, not spaces' "ZeroGPU worker error"."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from lab import policy
from lab.controls import Controls
from lab.panels import create_setup_panels
from lab.panels.preset import load_preset

# The tiny model as a Space visitor sets it up: evaluation on the hub's WikiText-2 (served locally by the fixture),
# one recovery and no baseline, so a stepped run has exactly four blocks.
SPACE_TINY = {"eval.source": "wikitext2", "baselines": [], "ebft.epochs": 2}


def _setup(**overrides):
    """(the page's SetupHandlers, their ``{component: value}``) for the tiny preset with ``overrides``, as the
    Space's page builds them."""
    from lab.runner import SetupHandlers

    config = load_preset("tiny-random").with_overrides({**SPACE_TINY, **overrides})
    with gr.Blocks():
        controls = Controls(create_setup_panels(config, policy.on_spaces()))
        card = gr.Dropdown(["this machine"], value="this machine")
    return SetupHandlers(controls, card), controls.updates(config)


def _click(handler, values, session: str = "alice") -> tuple:
    """The last update a click's handler sends to the page (RESULT_KEYS order: status first)."""
    return list(handler(values, SimpleNamespace(session_hash=session)))[-1]


def _summary(outputs) -> dict:
    """summary.json of the run whose record an update carries."""
    run_id = Path(outputs[8]).name.removesuffix(".zip")
    return json.loads((Path(policy.runs_dir()) / run_id / "summary.json").read_text())


def test_step_is_one_gpu_call_per_click_and_ends_as_one_run(zero_gpu):
    """No engine generator can wait between clicks in a ZeroGPU worker: each click is its own GPU call, which
    resumes the run from its folder; the stepped run ends with the same masks and perplexities as a Run."""
    handlers, values = _setup()
    statuses = []
    for click in range(4):
        statuses.append(_click(handlers.step_run, values)[0])
        assert f"paused** — block {click + 1} of 4 done (ebft); press Step" in statuses[-1]
    final = _click(handlers.step_run, values)  # the last click evaluates and finishes
    assert "finished" in final[0] and list(final[3].iloc[:, 0]) == ["dense", "ebft"]
    assert zero_gpu.calls == ["engine_step"] * 5  # one GPU call per click, never the engine on the host
    stepped = _summary(final)
    assert stepped["status"] == "finished"
    straight = _summary(_click(handlers.start_run, values, session="bob"))
    assert zero_gpu.calls[-1] == "engine_events"
    assert stepped["mask_sha256"] == straight["mask_sha256"]
    for label in ("dense", "ebft"):
        assert stepped["ppl"][label] == pytest.approx(straight["ppl"][label], rel=1e-3)
    # a finished run cannot be resumed: the engine refuses it in the worker, and the page says so in its words
    from lab.runner import resume_run

    refused = list(resume_run(stepped["run_id"], None))[-1]
    assert refused[0] == (f"**failed**\n\n⚠️ resume: run {stepped['run_id']} already finished; "
                          "start a new run instead")
    assert zero_gpu.calls[-1] == "engine_resume"


def test_stop_between_clicks_forgets_the_paused_run_and_the_next_step_starts_anew(zero_gpu):
    from lab.runner import stop_run

    handlers, values = _setup()
    first = _click(handlers.step_run, values)
    assert "block 1 of 4 done" in first[0]
    assert stop_run(SimpleNamespace(session_hash="alice")) == "Step-by-step run stopped."
    assert stop_run(SimpleNamespace(session_hash="alice")) == "Nothing is running."
    stopped = list(Path(policy.runs_dir()).iterdir())
    assert len(stopped) == 1 and json.loads((stopped[0] / "summary.json").read_text())["status"] == "cancelled"
    again = _click(handlers.step_run, values)
    assert "block 1 of 4 done" in again[0]
    assert len(list(Path(policy.runs_dir()).iterdir())) == 2  # a new run, not the stopped one resumed


@pytest.mark.parametrize("handler", ["start_run", "step_run"])
def test_an_error_before_the_first_event_reaches_the_status_as_the_engines_sentence(zero_gpu, handler):
    """calib.seqlen 300 is within the Space's limits but beyond the tiny model's context of 256: the engine's
    preflight refuses it inside the worker, where an exception would reach the page as "ZeroGPU worker error"."""
    handlers, values = _setup(**{"calib.seqlen": 300})
    status = _click(getattr(handlers, handler), values)[0]
    assert status == ("**failed**\n\n⚠️ calib.seqlen: 300 tokens is beyond the model's context of 256; "
                      "use at most 256")
    assert zero_gpu.calls == ["engine_step" if handler == "step_run" else "engine_events"]


def test_a_memory_plan_refusal_reaches_the_status_from_the_worker(zero_gpu, monkeypatch):
    from ebft_engine import phases

    monkeypatch.setattr(phases, "capacities", lambda device: (None, 10 * 1024 ** 2))  # forked into the worker
    handlers, values = _setup()
    status = _click(handlers.start_run, values)[0]
    assert status.startswith("**failed**\n\n⚠️ memory: the ") and "host memory" in status


@pytest.mark.parametrize("overrides,sentence", [
    ({"calib.nsamples": 1000}, "calib.nsamples: 1000 is above this Space's limit of 64; use at most 64, or run "
                               "the lab locally"),
    ({"model": "nobody/nothing"}, "model: cannot read 'nobody/nothing' from the hub; check the id"),
    ({"model": "HuggingFaceTB/SmolLM2-360M"}, "model: HuggingFaceTB/SmolLM2-360M has 362M parameters, more than "
                                              "this Space runs (144M: a larger run would not finish within the "
                                              "300 s GPU slot); pick smollm2-135m or a hub model of at most 144M "
                                              "parameters, or run the lab locally"),
])
def test_a_refusal_on_the_host_reaches_the_status_and_starts_no_gpu_call(zero_gpu, hub_configs, overrides,
                                                                          sentence):
    handlers, values = _setup()
    values = {**values, **{handlers.controls.components[k]: v for k, v in overrides.items()}}
    for handler in (handlers.start_run, handlers.step_run):
        assert _click(handler, values)[0] == f"**failed**\n\n⚠️ {sentence}"
    assert zero_gpu.calls == []


def test_zero_gpu_page_says_what_a_step_click_does_and_stop_cancels_a_click_in_flight(zero_gpu):
    from lab.app import build_app

    config = build_app().get_config_file()
    notes = [c["props"].get("value") for c in config["components"] if c["props"].get("elem_id") == "step-note"]
    assert len(notes) == 1 and "each click is its own GPU call" in notes[0]
    named = {d["api_name"]: d for d in config["dependencies"]}
    stop_button = named["stop"]["targets"]
    cancelled = {i for d in config["dependencies"] if d["targets"] == stop_button for i in d.get("cancels") or []}
    assert cancelled == {named["run"]["id"], named["step"]["id"]}  # (Gradio adds the cancelling event beside Stop's)


def test_on_a_workstation_too_a_step_refused_before_its_first_event_says_why(monkeypatch, tmp_path):
    """Step's engine generator raised the preflight's error at the first click's first read, past the handler's
    try: Gradio showed its own error instead of the sentence."""
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("EBFT_RUNS_DIR", str(tmp_path / "runs"))
    handlers, values = _setup(**{"calib.seqlen": 300})
    assert _click(handlers.step_run, values)[0] == ("**failed**\n\n⚠️ calib.seqlen: 300 tokens is beyond the model's "
                                                    "context of 256; use at most 256")
