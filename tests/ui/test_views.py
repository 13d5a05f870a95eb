"""Plots and tables are pure functions of an event list: tested on hand-written events."""
from __future__ import annotations

from ebft_engine.events import (BlockFinished, BlockStarted, EvalFinished, Notice, PhaseStarted, RunFinished,
                                RunStarted, StepLoss)
from lab import plots, tables
from lab.state import LAYERS, Throttle, fold

LAYERS_HALF = {name: 0.5 for name in LAYERS}


def _events(finished: bool = True):
    ev = [RunStarted(run_id="r1", run_dir="/tmp/r1", config={"prune": {"method": "wanda", "sparsity": 0.5}}),
          PhaseStarted("eval", "dense"),
          EvalFinished("dense", 20.0, "wikitext2", 1024, 4, 4096, True, 1.0),
          PhaseStarted("ebft", "ebft")]
    for block, (start, end) in enumerate([(1.0, 0.5), (2.0, 1.2)]):
        ev.append(BlockStarted("ebft", block, 3))
        for step in range(1, 4):
            ev.append(StepLoss("ebft", block, step, 3, start - (start - end) * step / 3, 1e-3))
        ev.append(BlockFinished("ebft", block, 3, start, end, 2.0, 0.5, LAYERS_HALF))
    ev.append(BlockStarted("ebft", 2, 3))
    ev.append(StepLoss("ebft", 2, 1, 3, 4.0, 1e-3))
    if finished:
        ev += [EvalFinished("ebft", 30.0, "wikitext2", 1024, 4, 4096, True, 1.0),
               Notice("info", "done"),
               RunFinished("finished", {"actual_sparsity": {"ebft": 0.5}, "eval": {"total_windows": 10}})]
    return ev


def test_fold_tracks_progress_and_losses():
    view = fold(_events(finished=False))
    assert view.status == "running" and view.phase == "ebft"
    assert view.progress.startswith("ebft: block 3 of 3, about 2 s left")
    assert view.initial == {0: 1.0, 1: 2.0} and view.final == {0: 0.5, 1: 1.2}
    assert [s for s, _ in view.steps[1]] == [1, 2, 3]
    assert view.ppl == {"dense": 20.0}


def test_loss_curves_highlight_current_block_and_mark_initial_loss():
    fig = plots.loss_curves(fold(_events(finished=False)))
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in lines] == ["block 0", "block 1", "block 2"]
    assert lines[2].line.width > lines[0].line.width and lines[0].opacity < 1  # live bright, finished faded
    assert lines[0].y[0] == 1.0 and lines[0].x[0] == 0  # each finished block starts at its initial loss
    markers = [t for t in fig.data if t.mode == "markers"][0]
    assert list(markers.y) == [1.0, 2.0]
    assert fig.layout.yaxis.type == "log" and fig.layout.uirevision == "keep"


def test_bars_table_and_heatmap_after_the_run():
    view = fold(_events())
    bars = plots.loss_bars(view)
    assert list(bars.data[0].y) == [1.0, 2.0] and list(bars.data[1].y) == [0.5, 1.2]
    table = tables.ppl_table(view)
    assert list(table["model"]) == ["dense", "ebft"]
    assert list(table["vs dense"]) == ["", "1.50×"] and list(table["sparsity"]) == ["", "50.00%"]
    assert tables.protocol(view) == "wikitext2, seqlen 1024, 4 of 10 windows (partial), 4096 tokens"
    heat = plots.sparsity_heatmap(view)
    assert list(heat.data[0].x) == list(LAYERS) and [list(r) for r in heat.data[0].z] == [[0.5] * 7] * 2
    ppl = plots.ppl_bars(view)
    assert list(ppl.data[0].x) == ["dense", "ebft"]
    # once finished, no block is drawn as live: each keeps its own colour, light to dark along the blocks
    lines = [t for t in plots.loss_curves(view).data if t.mode == "lines"]
    assert len({t.line.color for t in lines}) == len(lines) and all(t.line.width < 3 for t in lines)
    # every bar's label fits: the axis reaches above the tallest bar
    assert ppl.layout.yaxis.range[1] > max(ppl.data[0].y) and ppl.data[0].cliponaxis is False
    # block ticks are whole numbers, however few blocks there are
    assert heat.layout.yaxis.dtick == 1 and heat.layout.yaxis.tickmode == "linear"


def test_compare_runs_overlays_each_run():
    a, b = fold(_events()), fold(_events())
    fig = plots.compare_curves({"a": a, "b": b})
    assert [t.name for t in fig.data] == ["a after", "a before", "b after", "b before"]
    table = tables.compare_table({"a": a, "b": b})
    assert list(table.columns)[:4] == ["run", "method", "pattern", "sparsity"] and len(table) == 2


def test_empty_view_renders():
    view = fold([])
    for make in (plots.loss_curves, plots.loss_bars, plots.ppl_bars, plots.sparsity_heatmap):
        make(view)
    assert tables.ppl_table(view).empty


def test_throttle():
    t = Throttle(interval=60)
    assert t.ready() and not t.ready() and t.ready(force=True)


def test_lora_steps_do_not_mix_with_block_curves():
    from ebft_engine.events import PhaseStarted, StepLoss
    from lab.state import fold

    view = fold([StepLoss("ebft", 0, 1, 2, 0.5, 1e-3), PhaseStarted("lora", "lora"),
                 StepLoss("lora", -1, 1, 9, 3.2, 1e-4), StepLoss("lora", -1, 2, 9, 3.1, 1e-4)])
    view.status = "running"
    assert list(view.steps) == [0] and view.model_steps["lora"] == [(1, 3.2), (2, 3.1)]
    assert "step 2, language-model loss 3.100" in view.progress


def test_zero_shot_results_become_table_columns():
    from ebft_engine.events import EvalFinished, ZeroShotFinished
    from lab.state import fold
    from lab.tables import ppl_table

    view = fold([EvalFinished("dense", 20.0, "x", 64, 4, 256, True, 1.0),
                 ZeroShotFinished("dense", {"boolq": {"acc": 0.625, "acc_norm": 0.5, "examples": 8}}, 8, 2.0)])
    table = ppl_table(view)
    assert list(table["boolq acc (norm)"]) == ["0.625 (0.500)"]


def test_choosing_llm_pruner_shows_the_structured_pattern_and_leaving_it_goes_back():
    from lab.panels.prune import pattern_for_method

    assert pattern_for_method("llm-pruner", "unstructured") == "structured"
    assert pattern_for_method("wanda", "structured") == "unstructured"
    assert pattern_for_method("wanda", "2:4") != "unstructured"  # an N:M choice is left alone


def test_history_lists_runs_started_within_one_second_newest_first_and_offers_the_newest(tmp_path, monkeypatch):
    """Two stopped runs started 0.3 s apart, whose random id suffixes sort the other way: the table, and the
    Resume choice it defaults to, follow the order they started in (the flaky Stop -> History -> Resume test)."""
    import time as clock

    from ebft_engine.record import RunRecord
    from lab.panels.history import refresh_history

    second = clock.mktime(clock.strptime("20261129-120000", "%Y%m%d-%H%M%S"))
    for run_id, started in (("20261129-120000-f00000", second + 0.2), ("20261129-120000-0fffff", second + 0.5)):
        record = RunRecord(tmp_path, run_id)
        record.write_config({"model": "tiny-random", "prune": {"method": "wanda", "sparsity": 0.5}})
        record.append(RunStarted(run_id=run_id, run_dir=str(record.dir), config={}, time=started))
        record.write_summary({"status": "cancelled", "ppl": {}})
        record.close()
    assert list(tables.list_runs(tmp_path)["run"]) == ["20261129-120000-0fffff", "20261129-120000-f00000"]
    monkeypatch.setenv("EBFT_RUNS_DIR", str(tmp_path))
    _table, _chosen, offered = refresh_history()
    assert offered["value"] == "20261129-120000-0fffff"


def test_learned_masks_show_their_changes_beside_the_loss():
    ev = [RunStarted(run_id="r1", run_dir="/tmp/r1", config={}), PhaseStarted("ebft", "ebft-mask"),
          BlockStarted("ebft-mask", 0, 2)]
    ev += [StepLoss("ebft-mask", 0, s, 4, 1.0 / s, 1e-3, mask_change=c) for s, c in ((1, 0.02), (2, 0.01), (3, 0.0))]
    view = fold(ev)
    assert view.mask_changes == {0: [(1, 0.02), (2, 0.01), (3, 0.0)]}
    fig = plots.loss_curves(view)
    (changes,) = [t for t in fig.data if t.yaxis == "y2"]
    assert list(changes.y) == [2.0, 1.0, 0.0] and "mask changed" in changes.name
    assert fig.layout.yaxis2.overlaying == "y"
    # fixed-mask EBFT draws no such axis
    assert not [t for t in plots.loss_curves(fold(_events(finished=False))).data if t.yaxis == "y2"]


def test_this_machines_memory_plan_reads_a_presets_shipped_shape_and_plans_as_the_run_does(monkeypatch, tmp_path):
    """Offline, the llama-7b preset's "this machine" plan failed ("could not load huggyllama/llama-7b") where the
    t4 choice worked: both read the shape shipped in assets/model-configs. And like the run (phases._plan), a
    folder without safetensors files plans the dense copy it keeps in host memory between variants."""
    import json
    import re
    import shutil

    from ebft_engine import ModelLoadError, RunConfig, cards, models
    from lab.runner import plan_text_for

    def offline(source):
        raise ModelLoadError(f"model: could not load {source.path}: offline")

    paper = RunConfig.from_yaml("assets/presets/llama-7b-paper.yaml")
    monkeypatch.setattr(cards, "load_config", offline)  # as offline, wherever the config would be read from
    monkeypatch.setattr(models, "load_config", offline)
    text = plan_text_for(paper, "this machine")
    assert text.startswith("memory plan: host peak") and "could not load" not in text
    assert "(the model's shape from assets/model-configs/huggyllama--llama-7b.json)" in text
    data = re.compile(r"^\| data \| [^|]+ \| ([\d.]+) GiB \|$", re.M)  # the device column: "-" on a CPU
    assert data.search(text)[1] == "13.02"  # a hub id is taken to ship safetensors, as the run takes it
    monkeypatch.undo()
    folder = tmp_path / "llama-7b-bin"
    folder.mkdir()
    shutil.copy("assets/model-configs/huggyllama--llama-7b.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"")  # .bin only: no safetensors to re-read the dense blocks from
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    local = plan_text_for(paper.with_overrides({"model": str(folder)}), "this machine")
    assert data.search(local)[1] == "25.08"  # 13.02 + the blocks' 12.06 GiB copy, from the data phase on
