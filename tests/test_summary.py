"""RunSummary: the summary.json shape, read and written in one place, and the protocol sentence in one wording."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ebft_engine.summary import (BlockRow, CalibInfo, EvalInfo, MemoryPlanInfo, PrecisionInfo, RunError,
                                 RunSummary, protocol)

PRESET = Path(__file__).resolve().parents[1] / "assets" / "presets" / "tiny-random.yaml"

# The shape consumers of summary.json and --json-out rely on: a key dropped, renamed or moved fails here.
SUMMARY_KEYS = ["run_id", "status", "model", "ppl", "actual_sparsity", "mask_sha256", "sparsity_profile", "blocks",
                "lora", "zeroshot", "params", "structure", "dead_channel_weights", "eval", "calibration", "seconds",
                "precision", "memory_plan", "config", "pid", "error"]
EVAL_KEYS = ["source", "description", "seqlen", "windows", "total_windows", "tokens", "partial"]
CALIB_KEYS = ["source", "nsamples", "seqlen", "self_nsamples", "tokens"]
BLOCK_KEYS = ["label", "index", "initial_loss", "final_loss", "seconds", "sparsity"]
LORA_KEYS = ["steps", "epochs", "seconds", "adapter_params", "targets", "rank", "alpha", "budget", "first_loss",
             "last_loss"]
SENTENCE = ("file:assets/text/sample.txt, seqlen 128 (LLM-Pruner's 128-token protocol: reads higher than at "
            "2048), 8 of 26 windows (partial), 1024 tokens")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny-random preset, made shorter (less calibration, 1 EBFT epoch, one baseline) and with LoRA, run
    once: its RunFinished summary, the summary.json and --json-out it wrote, and its config."""
    from ebft_engine import RunConfig, run

    tmp = tmp_path_factory.mktemp("summary")
    config = RunConfig.from_yaml(PRESET).with_overrides({
        "calib.nsamples": 8, "calib.seqlen": 32, "ebft.epochs": 1, "baselines": ["magnitude"],
        "recoveries": ["ebft", "lora"], "lora.budget": "epochs", "lora.epochs": 1, "runs_dir": str(tmp / "runs"),
        "json_out": str(tmp / "out.json")})
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EBFT_CACHE_DIR", str(tmp / "cache"))
        os.chdir(PRESET.parents[2])  # the preset's eval text is relative to the repository
        try:
            events = list(run(config))
        finally:
            os.chdir(cwd)
    summary = events[-1].summary
    assert summary["status"] == "finished", summary.get("error")
    run_dir = Path(events[0].run_dir)
    return SimpleNamespace(summary=summary, config=config, run_dir=run_dir,
                           file=json.loads((run_dir / "summary.json").read_text()),
                           json_out=json.loads((tmp / "out.json").read_text()))


def test_a_real_summary_round_trips_exactly(tiny_run):
    from ebft_engine.record import to_json

    for written in (tiny_run.summary, tiny_run.file, tiny_run.json_out):
        back = RunSummary.from_dict(written).to_dict()
        assert back == written
        assert to_json(back, indent=2) == to_json(written, indent=2)  # same key order, all the way down
    assert tiny_run.file == tiny_run.json_out


def test_the_pipeline_writes_exactly_the_shape_runsummary_knows(tiny_run):
    summary = tiny_run.summary
    assert list(summary) == SUMMARY_KEYS
    assert list(summary["eval"]) == EVAL_KEYS and list(summary["calibration"]) == CALIB_KEYS
    assert summary["blocks"] and all(list(b) == BLOCK_KEYS for b in summary["blocks"])
    assert list(summary["lora"]) == LORA_KEYS
    assert list(summary["precision"]) == ["device", "storage", "compute"]
    assert list(summary["memory_plan"]) == ["activations", "phases"]
    assert all(list(ph) == ["device_gib", "host_gib"] for ph in summary["memory_plan"]["phases"].values())
    assert list(RunSummary().to_dict()) == SUMMARY_KEYS  # and RunSummary writes every one of them


def test_a_real_summary_reads_into_typed_fields(tiny_run):
    typed = RunSummary.from_dict(tiny_run.summary)
    assert typed.run_id == tiny_run.run_dir.name and typed.model == "tiny-random"
    assert set(typed.ppl) == {"dense", "magnitude", "ebft", "lora", "lora-merged"}
    assert typed.actual_sparsity["ebft"] == pytest.approx(0.5)
    assert [(b.label, b.index) for b in typed.blocks] == [("ebft", i) for i in range(4)]
    assert typed.lora.steps > 0 and typed.lora.targets == ["q_proj", "v_proj"]
    assert typed.eval.total_windows == 26 and typed.calibration.tokens == 8 * 32
    assert typed.precision == PrecisionInfo("cpu", "float32", "bfloat16")
    assert typed.memory_plan.activations == "host" and "ebft" in typed.memory_plan.phases
    assert typed.seconds["total"] >= typed.seconds["ebft:ebft"] > 0
    assert typed.pid == os.getpid() and typed.error is None and not typed.structured


def test_start_carries_what_the_pipeline_carries_on_resume(tiny_run, tmp_path):
    """RunSummary.start(previous) against what runner.Run writes when it takes up a run."""
    from ebft_engine.runner import Run as _Run
    from ebft_engine.record import RunRecord

    previous = dict(tiny_run.file, status="cancelled", error={"field": None, "message": "stopped"},
                    dead_channel_weights={"ebft": {"weights": 5, "layers": 2,
                                                   "blocks": {"0": {"q_proj": 3}, "1": {"o_proj": 2}}}})
    record = RunRecord(tmp_path, "r1")
    _Run(tiny_run.config, record, lambda: False, previous=previous)
    record.close()
    written = json.loads((record.dir / "summary.json").read_text())
    started = RunSummary.start("r1", tiny_run.config.to_dict(), previous)
    assert started.elapsed_before == previous["seconds"]["total"]
    mine = started.snapshot("running", written["seconds"]["total"] - started.elapsed_before)
    assert mine["seconds"].pop("total") == pytest.approx(written["seconds"].pop("total"))
    assert mine == written
    # what is found again on resume starts empty; everything measured is carried
    assert mine["eval"] == {} and mine["precision"] is None and mine["error"] is None
    assert mine["ppl"] == previous["ppl"] and mine["dead_channel_weights"] == previous["dead_channel_weights"]


def test_a_new_run_starts_empty_with_the_total_first():
    summary = RunSummary.start("r2", {"model": "tiny-random", "prune": {"pattern": "structured"}})
    first = summary.snapshot("running", 0.25)
    assert first == {**RunSummary().to_dict(), "run_id": "r2", "status": "running", "model": "tiny-random",
                     "seconds": {"total": 0.25}, "config": {"model": "tiny-random", "prune": {"pattern": "structured"}},
                     "pid": os.getpid()}
    summary.add_seconds("load", 1.0)
    summary.add_seconds("load", 0.5)
    assert list(summary.snapshot("finished", 2.0)["seconds"].items()) == [("total", 2.0), ("load", 1.5)]
    assert summary.structured


def test_the_pipeline_helpers_for_blocks_and_dead_channels():
    summary = RunSummary(blocks=[BlockRow("ebft", 0, 1.0, 0.5, 2.0, 0.5), BlockRow("ebft", 1),
                                 BlockRow("ebft-gp", 3), BlockRow("ebft", None)])
    summary.restart_blocks("ebft", 1)  # block 1 and the row without an index are redone
    assert [(b.label, b.index) for b in summary.blocks] == [("ebft", 0), ("ebft-gp", 3)]

    assert summary.add_dead_channels("wanda", 0, {"q_proj": 4, "k_proj": 0})
    assert summary.add_dead_channels("wanda", 2, {"o_proj": 1, "down_proj": 6})
    assert not summary.add_dead_channels("wanda", 3, {"o_proj": 0})  # nothing dead: nothing recorded
    dead = summary.dead_channel_weights["wanda"]
    assert (dead.weights, dead.layers) == (11, 3)
    summary.restart_dead_channels("wanda", 1)
    summary.restart_dead_channels("ebft", 0)  # a variant with none: not written
    assert summary.to_dict()["dead_channel_weights"] == {
        "wanda": {"weights": 4, "layers": 1, "blocks": {"0": {"q_proj": 4}}}}

    summary.error = RunError("prune.pattern", "4:8 groups every 8 input columns")
    assert summary.to_dict()["error"] == {"field": "prune.pattern", "message": "4:8 groups every 8 input columns"}


def test_precision_and_memory_plan_from_the_engine_objects():
    precision = SimpleNamespace(device=torch.device("cuda", 0), storage=torch.float16, compute=None)
    assert PrecisionInfo.of(precision).to_dict() == {"device": "cuda:0", "storage": "float16", "compute": "none"}
    plan = SimpleNamespace(activations="device", phases=[SimpleNamespace(phase="load", device=3 * 2 ** 30,
                                                                         host=1234567890)])
    assert MemoryPlanInfo.of(plan).to_dict() == {"activations": "device",
                                                 "phases": {"load": {"device_gib": 3.0, "host_gib": 1.15}}}


# The summary of the first engine that wrote one (commit ef2cb24): no mask digests, profiles, LoRA, zero-shot,
# parameter counts, structures, dead channels, memory plan, pid or error; block rows without a label;
# calibration without self_nsamples.
OLDEST = {
    "run_id": "20261128-090000-abcdef", "status": "finished", "model": "smollm2-135m",
    "ppl": {"dense": 20.5, "wanda": 30.25, "ebft": 25.0}, "actual_sparsity": {"wanda": 0.5, "ebft": 0.5},
    "blocks": [{"index": 0, "initial_loss": 0.2, "final_loss": 0.1, "seconds": 3.0, "sparsity": 0.5}],
    "eval": {"source": "wikitext2", "description": "WikiText-2 test", "seqlen": 2048, "windows": 140,
             "total_windows": 140, "tokens": 286720, "partial": False},
    "calibration": {"source": "c4", "nsamples": 64, "seqlen": 1024, "tokens": 65536},
    "seconds": {"total": 100.0, "load": 2.0}, "precision": {"device": "cpu", "storage": "float32",
                                                            "compute": "bfloat16"},
    "config": {"model": "smollm2-135m", "prune": {"method": "wanda", "pattern": "unstructured"}},
}


def test_an_older_summary_missing_newer_keys_reads():
    from ebft_engine.record import status_of

    old = RunSummary.from_dict(OLDEST)
    assert old.ppl == OLDEST["ppl"] and old.mask_sha256 == {} and old.lora is None and old.memory_plan is None
    assert old.blocks == [BlockRow("ebft", 0, 0.2, 0.1, 3.0, 0.5)]  # an unlabelled row is EBFT's
    assert old.calibration == CalibInfo("c4", 64, 1024, 0, 65536)
    assert old.pid is None and old.error is None and status_of(old) == "finished"
    assert old.protocol() == "WikiText-2 test, seqlen 2048, 140 of 140 windows (full), 286720 tokens"
    written = old.to_dict()
    assert list(written) == SUMMARY_KEYS  # written back in today's shape, what it had unchanged
    assert {k: written[k] for k in ("ppl", "actual_sparsity", "eval", "seconds", "precision", "config")} == \
        {k: OLDEST[k] for k in ("ppl", "actual_sparsity", "eval", "seconds", "precision", "config")}
    resumed = RunSummary.start(old.run_id, OLDEST["config"], OLDEST)
    assert resumed.ppl == OLDEST["ppl"] and resumed.elapsed_before == 100.0 and resumed.seconds == {"load": 2.0}


@pytest.mark.parametrize("data", [None, {}, {"ppl": None, "blocks": None, "eval": None, "lora": None,
                                             "seconds": None, "precision": None, "error": None},
                                  {"ppl": [], "blocks": [1, "x"], "dead_channel_weights": {"ebft": None},
                                   "memory_plan": {"phases": None}, "surprise": 1}])
def test_empty_null_or_odd_values_read_as_empty(data):
    from ebft_engine.record import status_of

    summary = RunSummary.from_dict(data)
    assert summary.ppl == {} and summary.blocks == [] and summary.eval is None and summary.lora is None
    assert "surprise" not in summary.to_dict() and list(summary.to_dict()) == SUMMARY_KEYS
    assert summary.status == ("interrupted" if not data or "status" not in data else data["status"])
    assert status_of(data) == "interrupted"


def test_the_protocol_sentence():
    info = EvalInfo(source="file:assets/text/sample.txt", description="file:assets/text/sample.txt", seqlen=128,
                    windows=8, total_windows=26, tokens=1024, partial=True)
    assert info.protocol() == SENTENCE
    assert protocol(info) == protocol(info.to_dict()) == SENTENCE
    assert protocol(None) == protocol({}) == RunSummary().protocol() == ""
    # the description when there is one, else the source; no total known (a live view): "N windows"
    live = EvalInfo(source="wikitext2", seqlen=1024, windows=4, tokens=4096, partial=True)
    assert live.protocol() == "wikitext2, seqlen 1024, 4 windows (partial), 4096 tokens"
    assert live.merged(EvalInfo(total_windows=10)).protocol() == \
        "wikitext2, seqlen 1024, 4 of 10 windows (partial), 4096 tokens"
    assert EvalInfo("c4", "C4 validation", 2048, 256, 256, 524288, False).protocol() == \
        "C4 validation, seqlen 2048, 256 of 256 windows (full), 524288 tokens"


def test_every_place_shows_the_same_protocol_sentence(tiny_run):
    """The command line's table, the grid's Markdown and the lab's protocol line all say it in one wording."""
    from ebft_engine import grid
    from ebft_engine.cli import format_table
    from lab import tables

    summary = tiny_run.summary
    assert RunSummary.from_dict(summary).protocol() == SENTENCE
    assert format_table(summary).endswith(f"\nprotocol: {SENTENCE}")
    assert format_table(RunSummary.from_dict(summary)) == format_table(summary)
    header, rows = grid.table({grid.Cell("0.5", "magnitude"): summary}, ["ebft"])
    assert rows[0][-1] == summary["run_id"] and rows[0][2] == summary["ppl"]["dense"]
    assert grid.to_markdown(header, rows, RunSummary.from_dict(summary).protocol()).endswith(
        f"protocol: {SENTENCE}\n")
    view = tables.load_view(tiny_run.run_dir)
    assert tables.protocol(view) == SENTENCE
    assert view.summary == RunSummary.from_dict(summary)
