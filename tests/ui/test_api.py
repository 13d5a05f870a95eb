"""The launched lab through gradio_client, on the tiny built-in model."""
from __future__ import annotations

import time

from lab.panels.preset import load_preset


def _values(**overrides):
    """The tiny-random preset's control values, some overridden by field path, in the order the HTTP API takes
    them (the order the page creates its controls in: Controls.api_order)."""
    import gradio as gr

    from lab.controls import Controls, config_to_values
    from lab.panels import create_setup_panels

    config = load_preset("tiny-random")
    with gr.Blocks():
        controls = Controls(create_setup_panels(config, spaces=False))
    values = config_to_values(config, controls.api_order)
    assert set(overrides) <= set(values), f"not a control: {set(overrides) - set(values)}"
    values.update(overrides)
    return list(values.values())


def _losses(plot_output) -> list[float]:
    import json

    fig = plot_output["plot"] if isinstance(plot_output, dict) and "plot" in plot_output else plot_output
    fig = json.loads(fig) if isinstance(fig, str) else fig
    return [y for trace in fig.get("data", []) if trace.get("mode") == "lines" for y in trace.get("y", [])]


def _wait_for(job, condition, what: str, timeout: float = 120) -> None:
    """Wait until one of the job's streamed outputs meets ``condition`` (checked as they arrive, a few a second);
    fail saying ``what`` did not happen if the job ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not any(condition(o) for o in job.outputs()):
        assert not job.done() and time.monotonic() < deadline, f"{what} (job done: {job.done()})"
        time.sleep(0.05)


def _training(output) -> bool:
    return bool(_losses(output[1]))


def _run_id(outputs) -> str:
    """The id of the run an update belongs to: the name of its record (the zip the last update carries)."""
    from pathlib import Path

    assert outputs[8], "the run's last update carries no record"
    return Path(outputs[8]).name.removesuffix(".zip")


def test_run_streams_updates_and_fills_the_table(lab_url):
    from gradio_client import Client

    client = Client(lab_url, verbose=False)
    job = client.submit(*_values(), api_name="/run")
    outputs = list(job)
    assert len(outputs) >= 5  # several intermediate updates arrived
    status, loss_plot, _bars, table = outputs[-1][:4]
    assert "finished" in status
    assert [row[0] for row in table["data"]] == ["dense", "magnitude", "wanda", "ebft"]
    # the loss fell: within the last finished block's curve, the final point is below the first
    mid = [o for o in outputs if _losses(o[1])]
    assert mid, "no loss curve was streamed"
    losses = _losses(loss_plot)
    assert min(losses) < max(losses)


def test_bad_input_reaches_the_page_as_one_sentence(lab_url):
    from gradio_client import Client

    client = Client(lab_url, verbose=False)
    result = client.predict(*_values(**{"calib.nsamples": 2, "ebft.batch_size": 4}), api_name="/run")
    status = result[0]
    assert "failed" in status and "ebft.batch_size: 4 is larger than calib.nsamples (2)" in status
    assert "Traceback" not in status


def test_stop_cancels_and_the_next_run_works(lab_url):
    from gradio_client import Client

    client = Client(lab_url, verbose=False)
    job = client.submit(*_values(**{"ebft.epochs": 400}), api_name="/run")
    _wait_for(job, _training, "training never started")
    assert "Stopping" in client.predict(api_name="/stop")
    final = job.result(timeout=120)
    assert "cancelled" in final[0]
    assert [row[0] for row in final[3]["data"]][:1] == ["dense"]  # partial results stay
    again = client.predict(*_values(), api_name="/run")
    assert "finished" in again[0]


def test_yaml_export_reproduces_the_config(lab_url, tmp_path):
    from gradio_client import Client

    from ebft_engine import RunConfig

    client = Client(lab_url, verbose=False)
    path, note = client.predict(*_values(**{"prune.sparsity": 0.7}), api_name="/export_yaml")
    config = RunConfig.from_yaml(path)
    assert config.prune.sparsity == 0.7 and config.model == "tiny-random" and "--config" in note


def test_step_mode_runs_one_block_per_click(lab_url):
    from gradio_client import Client

    client = Client(lab_url, verbose=False)
    values = _values(**{"baselines": [], "ebft.epochs": 2})
    first = client.predict(*values, api_name="/step")
    assert "paused" in first[0] and "block 1 of 4 done (ebft)" in first[0]
    second = client.predict(*values, api_name="/step")
    assert "block 2 of 4 done" in second[0]
    for _ in range(2):
        last = client.predict(*values, api_name="/step")
    assert "block 4 of 4 done" in last[0]
    final = client.predict(*values, api_name="/step")  # the last click evaluates and finishes
    assert "finished" in final[0] and [r[0] for r in final[3]["data"]] == ["dense", "ebft"]
    client.predict(*values, api_name="/step")  # a new stepped run starts
    assert "stopped" in client.predict(api_name="/stop")


def test_two_sessions_each_see_only_their_own_run_and_queue_for_the_device(lab_url):
    from gradio_client import Client

    alice, bob = Client(lab_url, verbose=False), Client(lab_url, verbose=False)
    job_a = alice.submit(*_values(**{"prune.sparsity": 0.25, "baselines": []}), api_name="/run")
    job_b = bob.submit(*_values(**{"prune.sparsity": 0.75, "baselines": []}), api_name="/run")
    final_a, final_b = job_a.result(timeout=300), job_b.result(timeout=300)
    assert "finished" in final_a[0] and "finished" in final_b[0]
    sparsity_a = [row[3] for row in final_a[3]["data"] if row[0] == "ebft"]
    sparsity_b = [row[3] for row in final_b[3]["data"] if row[0] == "ebft"]
    assert sparsity_a == ["25.00%"] and sparsity_b == ["75.00%"]  # each got its own run's numbers
    # one job at a time on the device: the two runs' folders do not overlap in time
    import json
    from pathlib import Path

    from lab import policy

    spans = []
    for folder in Path(policy.runs_dir()).iterdir():
        events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
        config = json.loads((folder / "config.json").read_text())
        if config["prune"]["sparsity"] in (0.25, 0.75) and not config["baselines"]:
            start = events[0]["time"]
            spans.append((start, folder.stat().st_mtime, config["prune"]["sparsity"]))
    spans.sort()
    assert len(spans) == 2 and spans[0][1] <= spans[1][0] + 0.5
    # Stop from one session does not touch the other's run (pressed once Alice's run is going: a Stop that
    # arrives before the run has begun finds nothing to stop, and the 400 epochs would run on)
    job_a = alice.submit(*_values(**{"ebft.epochs": 400, "baselines": []}), api_name="/run")
    _wait_for(job_a, lambda output: True, "Alice's run never started")
    assert "Nothing is running" in bob.predict(api_name="/stop")
    assert "Stopping" in alice.predict(api_name="/stop")
    assert "cancelled" in job_a.result(timeout=120)[0]


def test_a_stopped_run_is_offered_in_history_and_resumes_to_the_end(lab_url, tmp_path, monkeypatch):
    """The run is picked by its own id, in a runs folder of its own: the other tests' stopped runs (one of them
    started within a second of this one) are not in its History."""
    from gradio_client import Client

    monkeypatch.setenv("EBFT_RUNS_DIR", str(tmp_path / "runs"))  # the in-process lab reads it on every call
    client = Client(lab_url, verbose=False)
    job = client.submit(*_values(**{"ebft.epochs": 40, "baselines": ["wanda"]}), api_name="/run")
    _wait_for(job, _training, "training never started")
    assert "Stopping" in client.predict(api_name="/stop")
    outputs = job.result(timeout=120)
    assert "cancelled" in outputs[0]
    stopped = _run_id(outputs)
    table, _chosen, offered = client.predict(api_name="/history")
    assert [row[:2] for row in table["data"]] == [[stopped, "cancelled"]] and offered["value"] == stopped
    final = client.predict(stopped, api_name="/resume")
    assert "finished" in final[0] and _run_id(final) == stopped
    assert [row[0] for row in final[3]["data"]] == ["dense", "wanda", "ebft"]
    assert _losses(final[1]), "the resumed run shows its loss curves"
    table, _chosen, offered = client.predict(api_name="/history")
    assert [row[:2] for row in table["data"]] == [[stopped, "finished"]]
    assert stopped not in [choice[0] for choice in offered["choices"]]
    # a name that is not in the list (a path, say) is refused: by the dropdown, and by the handler behind it
    import pytest
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("../../etc", api_name="/resume")
    from lab.runner import resume_run

    refused = list(resume_run("../../etc", None))[-1]
    assert "failed" in refused[0] and "not a run in the history" in refused[0]


def test_memory_plan_before_a_run(lab_url):
    from gradio_client import Client

    client = Client(lab_url, verbose=False)
    text = client.predict(*_values(), "this machine", api_name="/plan")
    assert text.startswith("memory plan: host peak") and "fits" in text and "| ebft |" in text
    bad = client.predict(*_values(**{"model": "/nowhere/model.gguf"}), "this machine", api_name="/plan")
    assert bad.startswith("⚠️") and "Traceback" not in bad
    # the same card list as `python -m ebft_engine plan --gpu`: a T4 gets fp16 with a gradient scaler
    t4 = client.predict(*_values(), "t4", api_name="/plan")
    assert "card: NVIDIA T4 16 GB" in t4 and "with a gradient scaler" in t4 and "verdict: fits" in t4


def test_a_structured_run_from_the_controls_reports_the_smaller_model(lab_url):
    """Method llm-pruner (the pattern dropdown may stay unstructured: the method implies it) on the tiny model,
    with the first and last of its four blocks kept whole: the table gives every model's parameter count."""
    from gradio_client import Client

    client = Client(lab_url, verbose=False)
    values = _values(**{"prune.method": "llm-pruner", "prune.sparsity": 0.2, "baselines": ["llm-pruner"],
                        "prune.keep_first": 1, "prune.keep_last": 1, "prune.taylor_samples": 4,
                        "prune.taylor_seqlen": 16})
    status, _loss, _bars, table, protocol = client.predict(*values, api_name="/run")[:5]
    assert "finished" in status
    rows = {row[0]: row for row in table["data"]}
    assert set(rows) == {"dense", "llm-pruner", "ebft"}
    sparsity, params = rows["ebft"][3].split(", ")
    assert abs(float(sparsity.rstrip("%")) - 20) < 1 and params.endswith("M parameters")
    refused = client.predict(*_values(**{"prune.method": "llm-pruner", "baselines": ["wanda"]}), api_name="/run")
    assert "run structured pruning (llm-pruner) and the other methods as separate runs" in str(refused)
