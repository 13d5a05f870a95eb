"""The whole run on the tiny model: event order, records, comparisons, cancellation, export."""
from __future__ import annotations

import csv
import json
import threading

import pytest

from ebft_engine import read_events, run
from ebft_engine.events import (BlockFinished, BlockStarted, PhaseStarted, RunFinished, RunStarted,
                                StepLoss)


def _collect(config, cancel=None):
    return list(run(config, cancel))


def test_event_order_and_summary(tiny_run_config):
    config = tiny_run_config.with_overrides({"baselines": "magnitude,wanda,sparsegpt"})
    events = _collect(config)
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    assert sum(isinstance(e, RunFinished) for e in events) == 1
    finished = events[-1]
    assert finished.status == "finished", [e for e in events if e.kind == "notice"]
    assert list(finished.summary["ppl"]) == ["dense", "magnitude", "wanda", "sparsegpt", "ebft"]
    # phases in order: load, data, dense eval, then per variant its block pass and its eval
    phases = [(e.phase, e.label) for e in events if isinstance(e, PhaseStarted)]
    assert phases[:3] == [("load", config.model), ("data", ""), ("eval", "dense")]
    assert phases[3:] == [("prune", "magnitude"), ("eval", "magnitude"), ("prune", "wanda"), ("eval", "wanda"),
                          ("prune", "sparsegpt"), ("eval", "sparsegpt"), ("ebft", "ebft"), ("eval", "ebft")]
    # within EBFT: block k starts, its steps, then it finishes, before block k+1 starts
    ebft = [e for e in events if getattr(e, "label", None) == "ebft" and isinstance(e, (BlockStarted, StepLoss,
                                                                                          BlockFinished))]
    blocks = [(type(e).__name__, e.block) for e in ebft if not isinstance(e, StepLoss)]
    assert blocks == [("BlockStarted", 0), ("BlockFinished", 0), ("BlockStarted", 1), ("BlockFinished", 1)]
    assert all(e.block == 0 for e in ebft[1:ebft.index(next(e for e in ebft if isinstance(e, BlockFinished)))])
    for e in ebft:
        if isinstance(e, BlockFinished):
            assert e.final_loss < e.initial_loss
            assert e.sparsity == pytest.approx(0.5)
    summary = finished.summary
    assert set(summary["actual_sparsity"]) == {"magnitude", "wanda", "sparsegpt", "ebft"}
    assert all(s == pytest.approx(0.5) for s in summary["actual_sparsity"].values())
    assert [b["index"] for b in summary["blocks"]] == [0, 1]
    assert summary["eval"]["windows"] == 4 and summary["eval"]["partial"] is True
    assert {"total", "load", "data", "eval:dense", "ebft:ebft"} <= set(summary["seconds"])


def test_run_folder_holds_the_record(tiny_run_config):
    events = _collect(tiny_run_config)
    run_dir = events[0].run_dir
    from pathlib import Path

    folder = Path(run_dir)
    assert json.loads((folder / "config.json").read_text()) == tiny_run_config.to_dict()
    assert json.loads((folder / "summary.json").read_text()) == events[-1].summary
    stored = read_events(folder)
    assert [e.kind for e in stored] == [e.kind for e in events]
    rows = list(csv.DictReader((folder / "blocks.csv").open()))
    assert [(r["label"], r["block"]) for r in rows] == [("ebft", "0"), ("ebft", "1")]
    # a torn last line (a crash mid-write) is skipped by the reader
    with (folder / "events.jsonl").open("a") as f:
        f.write('{"kind": "step_loss", "label": "eb')
    assert len(read_events(folder)) == len(events)


def test_json_out_and_saved_model_reload_to_same_perplexity(tiny_run_config, tmp_path):
    out, saved = tmp_path / "summary.json", tmp_path / "sparse-model"
    config = tiny_run_config.with_overrides({"json_out": str(out), "save_model": str(saved)})
    events = _collect(config)
    assert events[-1].status == "finished"
    assert json.loads(out.read_text())["ppl"] == events[-1].summary["ppl"]
    assert (saved / "model.safetensors").is_file()
    again = _collect(config.with_overrides({"model": str(saved), "ebft.epochs": 0, "prune.sparsity": 0.0,
                                            "json_out": None, "save_model": None}))
    assert again[-1].summary["ppl"]["dense"] == pytest.approx(events[-1].summary["ppl"]["ebft"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    weight = reloaded.model.layers[0].mlp.down_proj.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)


def test_cancel_between_steps_keeps_partial_results(tiny_run_config):
    cancel = threading.Event()
    events = []
    for event in run(tiny_run_config.with_overrides({"baselines": "wanda"}), cancel):
        events.append(event)
        if isinstance(event, StepLoss) and event.step == 3:
            cancel.set()
    finished = events[-1]
    assert finished.status == "cancelled"
    steps_after = [e for e in events[events.index(next(e for e in events if isinstance(e, StepLoss)
                                                          and e.step == 3)) + 1:] if isinstance(e, StepLoss)]
    assert steps_after == []  # ended within one step
    assert set(finished.summary["ppl"]) == {"dense", "wanda"}  # finished numbers survive
    # the process is ready for the next run
    assert _collect(tiny_run_config)[-1].status == "finished"


def test_consumer_closing_the_generator_records_cancelled(tiny_run_config):
    gen = run(tiny_run_config)
    first = next(gen)
    gen.close()
    from pathlib import Path

    summary = json.loads((Path(first.run_dir) / "summary.json").read_text())
    assert summary["status"] == "cancelled"


def test_failure_is_reported_as_events_not_traceback(tiny_run_config, tmp_path):
    """A model whose config reads but whose weights do not load fails inside the run, as events."""
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_run_config.model, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    events = _collect(tiny_run_config.with_overrides({"model": str(broken)}))
    assert events[-1].status == "failed"
    notice = [e for e in events if e.kind == "notice" and e.level == "error"][0]
    assert notice.text.startswith("model: could not load") and "Traceback" not in notice.text


@pytest.mark.parametrize("overrides,words", [
    ({"model": "/nowhere/model"}, "model: '/nowhere/model' does not exist; check the path"),
    ({"model": "./no-such-folder"}, "model: './no-such-folder' does not exist"),
    ({"model": "NOT-A-MODEL-DIR"}, None),  # filled in below: a folder without config.json
    ({"eval.source": "file:/nonexistent.txt"}, "eval.source: file '/nonexistent.txt' does not exist"),
    ({"device": "cuda"}, "device: 'cuda' was asked for but no CUDA GPU is visible"),
])
def test_what_is_missing_is_refused_before_a_run_folder_exists(tiny_run_config, tmp_path, overrides, words):
    """A model path, a text file or a device that is not there is bad input: one line, no run folder."""
    from pathlib import Path

    from ebft_engine import EbftError

    if overrides.get("model") == "NOT-A-MODEL-DIR":
        (tmp_path / "not-a-model").mkdir()
        overrides, words = {"model": str(tmp_path / "not-a-model")}, "has no config.json"
    if overrides.get("device") == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(EbftError) as info:
        _collect(tiny_run_config.with_overrides(overrides))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not Path(tiny_run_config.runs_dir).exists() or not any(Path(tiny_run_config.runs_dir).iterdir())


@pytest.mark.parametrize("overrides, words", [
    ({"calib.seqlen": 5000}, "calib.seqlen: 5000 tokens is beyond the model's context of 128; use at most 128"),
    ({"eval.seqlen": 129}, "eval.seqlen: 129 tokens is beyond the model's context of 128; use at most 128"),
    ({"prune.pattern": "4:5", "prune.sparsity": None}, "prune.pattern: 4:5 groups every 5 input columns"),
])
def test_what_the_models_config_rules_out_is_refused_before_a_run_folder_exists(tiny_run_config, overrides, words):
    from pathlib import Path

    from ebft_engine import ConfigError

    with pytest.raises(ConfigError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        next(run(tiny_run_config.with_overrides(overrides)))
    runs = Path(tiny_run_config.runs_dir)
    assert not runs.exists() or not any(runs.iterdir())


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("model, pattern, structure, named", [
    # o_proj reads heads x head_dim = 60 columns while the hidden size (48) is a multiple of 8 (issue #11)
    (dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=20), "4:8", None,
     ["o_proj reads 60 columns (3 heads x head_dim 20)"]),
    # only the MLP's width: down_proj reads the intermediate size
    (dict(intermediate_size=100), "4:8", None, ["down_proj reads 100 columns"]),
    # the hidden size: every projection that reads it, and o_proj through hidden / heads
    (dict(hidden_size=36, num_attention_heads=2, intermediate_size=76), "2:8", None,
     ["q_proj, k_proj, v_proj, gate_proj, up_proj read 36 columns", "o_proj reads 36 columns (2 heads x head_dim 18)",
      "down_proj reads 76 columns"]),
    # a saved structurally pruned model: block 1 kept 90 MLP channels and 3 of 4 heads
    (dict(), "4:8", [None, {"heads": 3, "kv_heads": 1, "channels": 90}],
     ["down_proj reads 90 columns in block 1"]),  # o_proj's 3 x 16 = 48 fits
])
def test_n_of_m_needs_every_pruned_layers_input_width_to_be_a_multiple_of_m(model, pattern, structure, named):
    from ebft_engine import ConfigError, RunConfig
    from ebft_engine.pipeline import check_against_model

    config = RunConfig.from_dict({"prune": {"pattern": pattern}, "calib": {"seqlen": 32}, "eval": {"seqlen": 64}})
    with pytest.raises(ConfigError) as refused:
        check_against_model(config, _llama_config(**model), structure)
    e = refused.value
    assert e.field == "prune.pattern" and "--pattern unstructured" in e.fix
    for words in named:
        assert words in e.problem, e.problem
    widths = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # no layer that fits is named
    assert {w for w in widths if w in e.problem} == {w for text in named for w in widths if w in text}


@pytest.mark.parametrize("model, pattern", [
    (dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=20), "2:4"),  # 48, 60, 128
    (dict(), "4:8"),
])
def test_n_of_m_that_fits_every_width_passes(model, pattern):
    from ebft_engine import RunConfig
    from ebft_engine.pipeline import check_against_model

    config = RunConfig.from_dict({"prune": {"pattern": pattern}, "calib": {"seqlen": 32}, "eval": {"seqlen": 64}})
    assert check_against_model(config, _llama_config(**model)) == 64


def test_dense_weights_restored_between_variants(tiny_run_config):
    """Every variant starts from the dense weights: wanda as a baseline equals wanda run alone."""
    both = _collect(tiny_run_config.with_overrides({"baselines": "sparsegpt,wanda", "ebft.epochs": 0}))
    alone = _collect(tiny_run_config.with_overrides({"baselines": "wanda", "ebft.epochs": 0}))
    assert both[-1].summary["ppl"]["wanda"] == pytest.approx(alone[-1].summary["ppl"]["wanda"], rel=1e-9)


def test_unwritable_runs_dir_is_refused_before_the_run(tiny_run_config, tmp_path):
    from ebft_engine import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="runs_dir"):
        next(run(tiny_run_config.with_overrides({"runs_dir": str(blocker / "runs")})))


def test_a_block_that_training_made_worse_keeps_its_pruned_weights(tiny_run_config):
    events = _collect(tiny_run_config.with_overrides({"ebft.lr": 0.5, "ebft.max_grad_norm": 1000.0}))
    warned = [e for e in events if e.kind == "notice" and "raised the reconstruction loss" in e.text]
    assert warned, "a learning rate of 0.5 should overshoot"
    for e in events:
        if isinstance(e, BlockFinished) and e.label == "ebft":
            assert e.final_loss <= e.initial_loss * (1 + 1e-6)


def test_large_models_restore_dense_blocks_from_their_files(tiny_run_config, monkeypatch):
    """Above the in-memory cache limit the dense blocks come back from the model's safetensors: same numbers."""
    from ebft_engine.models import loading

    config = tiny_run_config.with_overrides({"baselines": "magnitude,wanda"})
    in_memory = _collect(config)[-1].summary
    monkeypatch.setattr(loading, "CACHE_MAX_PARAMS", 0)  # read where load_model_cached lives
    loading._CACHE.clear()
    events = _collect(config)
    assert not [e for e in events if e.kind == "notice" and e.level == "warning"]  # no in-memory copy was made
    from_files = events[-1].summary
    assert from_files["ppl"] == pytest.approx(in_memory["ppl"], rel=1e-6)
    assert from_files["mask_sha256"] == in_memory["mask_sha256"]
