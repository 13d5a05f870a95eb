"""The command line: flags spelled as documented, errors as one line, the table at the end."""
from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys

from ebft_engine.cli import FLAGS, build_parser, config_from_args, main

DOCUMENTED = ["--model", "--method", "--sparsity", "--pattern", "--calib", "--nsamples", "--seqlen", "--epochs",
              "--lr", "--batch-size", "--eval", "--eval-seqlen", "--eval-windows", "--baselines", "--device",
              "--dtype", "--seed", "--json-out", "--save-model"]


def test_documented_flags_exist():
    assert set(DOCUMENTED) <= set(FLAGS)
    args = build_parser().parse_args(["run", "--config", "assets/presets/smollm2-demo.yaml", "--sparsity", "0.7",
                                      "--baselines", "magnitude,sparsegpt", "--eval-windows", "4"])
    config = config_from_args(args)
    assert config.prune.sparsity == 0.7 and config.baselines == ("magnitude", "sparsegpt")
    assert config.eval.windows == 4 and config.calib.source == "self"  # the rest comes from the preset


def test_bad_flag_value_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "ebft_engine", "run", "--sparsity", "1.5"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: prune.sparsity: 1.5 is outside [0, 1); give the fraction of weights to remove, e.g. 0.5 for 50%"]


def test_cli_run_on_tiny_model_prints_table(tiny_run_config, tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(tiny_run_config.to_yaml())
    out = io.StringIO()
    code = main(["run", "--config", str(preset), "--baselines", "wanda", "--json-out", str(tmp_path / "s.json"),
                 "--quiet"], out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "| dense |" in text and "| wanda |" in text and "| ebft |" in text and "partial" in text
    assert set(json.loads((tmp_path / "s.json").read_text())["ppl"]) == {"dense", "wanda", "ebft"}
    # --quiet: no progress, no info lines; the table and the status (warnings and errors would show too)
    assert "[info]" not in text and "ppl[" not in text and "== " not in text and not text.startswith("run ")
    assert "status: finished (run folder " in text.rstrip().splitlines()[-1]  # where the run went, even quiet


class _FullDisk(io.StringIO):
    """An output that cannot be written, as `> /dev/full` or a full disk."""

    def write(self, text):
        raise OSError(28, "No space left on device")


def test_an_output_that_fails_does_not_stop_the_run(tiny_run_config, tmp_path, capsys):
    """A failed write to stdout aborted the run it was printing; now one line, and the run finishes."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(tiny_run_config.to_yaml())
    code = main(["run", "--config", str(preset), "--baselines", "wanda", "--json-out", str(tmp_path / "s.json")],
                out=_FullDisk())
    err = capsys.readouterr().err
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "output cannot be written (No space left on device)" in line]
    assert err.count("output cannot be written") == 1 and "its results go to" in err
    assert set(json.loads((tmp_path / "s.json").read_text())["ppl"]) == {"dense", "wanda", "ebft"}


def test_missing_model_is_bad_input_with_one_line(tiny_run_config, tmp_path, capsys):
    out = io.StringIO()
    code = main(["run", "--model", str(tmp_path / "nowhere.gguf"), "--runs-dir", str(tmp_path / "runs"),
                 "--quiet"], out=out)
    assert code == 2 and not (tmp_path / "runs").exists()  # refused before a run folder exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GGUF file" in err[0] and "does not exist" in err[0]


def _start_long_run(config, tmp_path):
    """A CLI subprocess on the tiny model with thousands of epochs, returned once EBFT has begun."""
    import os
    import time

    preset = tmp_path / "long.yaml"
    preset.write_text(config.with_overrides({"ebft.epochs": 2000}).to_yaml())
    proc = subprocess.Popen([sys.executable, "-m", "ebft_engine", "run", "--config", str(preset)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a shell's background job starts with SIGINT ignored, and Python keeps it so: give
                            # the child the default disposition, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        lines.append(proc.stdout.readline())
        if lines[-1].startswith("== ebft"):
            break
    return proc, lines


def test_ctrl_c_cancels_and_keeps_the_partial_summary(tiny_run_config, tmp_path):
    import signal
    import time

    proc, lines = _start_long_run(tiny_run_config, tmp_path)
    time.sleep(1.0)  # a few training steps
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + out
    assert "status: cancelled" in out and "| dense |" in out
    run_dir = next((tmp_path / "runs").iterdir())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "cancelled"


def test_a_killed_run_says_interrupted_and_keeps_its_finished_numbers(tiny_run_config, tmp_path):
    import signal

    from ebft_engine import read_events
    from ebft_engine.record import run_status
    from lab.tables import list_runs

    proc, _ = _start_long_run(tiny_run_config, tmp_path)
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_status(run_dir) == "running"  # alive: not mistaken for a crash
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert run_status(run_dir) == "interrupted"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "running" and "dense" in summary["ppl"]  # the dense number survived
    assert read_events(run_dir)[0].kind == "run_started"
    listed = list_runs(tmp_path / "runs")
    assert list(listed["status"]) == ["interrupted"]


def test_grid_writes_one_table_for_methods_sparsities_and_recoveries(tiny_run_config, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(tiny_run_config.with_overrides({"ebft.epochs": 1}).to_yaml())
    out = io.StringIO()
    code = main(["grid", "--config", str(preset), "--methods", "magnitude,wanda", "--sparsities", "0.5,2:4",
                 "--recoveries", "ebft,lora", "--lora-budget", "epochs", "--lora-epochs", "1",
                 "--out", str(tmp_path / "table")], out=out)
    assert code == 0, out.getvalue()
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [(r["sparsity"], r["method"]) for r in rows] == [("0.5", "magnitude"), ("0.5", "wanda"),
                                                             ("2:4", "magnitude"), ("2:4", "wanda")]
    assert all(r["pruned"] and r["ebft"] and r["lora"] and r["lora-merged"] for r in rows)
    assert len({r["dense"] for r in rows}) == 1  # the same dense model in every run
    assert "| 2:4 | wanda |" in (tmp_path / "table.md").read_text()
    bad = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(bad):
        assert main(["grid", "--config", str(preset), "--methods", "wanda", "--sparsities", "0.5,lots",
                     "--out", str(tmp_path / "t2")]) == 2
    assert "grid.sparsities: 'lots' is neither a fraction nor N:M" in bad.getvalue()
    assert not (tmp_path / "t2.csv").exists()


def _refused(argv):
    import contextlib

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv, out=out)
    return code, err.getvalue().strip().splitlines(), out.getvalue()


def test_what_the_models_config_rules_out_exits_2_with_one_line_and_no_run_folder(tiny_run_config, tmp_path):
    """Issue #11: a context-length refusal exited 1 and left a failed run folder; 4:8 on a model whose o_proj
    reads 60 columns was refused after the dense evaluation, without naming o_proj."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft_engine.models import byte_tokenizer

    torch.manual_seed(0)
    narrow = tmp_path / "heads-of-20"
    LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=3, num_key_value_heads=3, head_dim=20,
                                 max_position_embeddings=128)).save_pretrained(narrow)
    byte_tokenizer().save_pretrained(narrow)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(tiny_run_config.to_yaml())
    runs = tmp_path / "refused-runs"
    base = ["run", "--config", str(preset), "--runs-dir", str(runs), "--quiet"]

    code, err, out = _refused(base + ["--seqlen", "256"])
    assert (code, err, out) == (2, ["error: calib.seqlen: 256 tokens is beyond the model's context of 128; use at "
                                    "most 128"], "")
    code, err, out = _refused(base + ["--eval-seqlen", "4096"])
    assert code == 2 and err == ["error: eval.seqlen: 4096 tokens is beyond the model's context of 128; use at "
                                 "most 128"]
    code, err, out = _refused(base + ["--model", str(narrow), "--pattern", "4:8"])
    assert code == 2 and err == [
        "error: prune.pattern: 4:8 groups every 8 input columns of a layer, and o_proj reads 60 columns (3 heads x "
        "head_dim 20), not a multiple of 8; use an N:M pattern whose M divides every layer's width (all are "
        "multiples of 4), such as 2:4, or --pattern unstructured"], err
    # a grid is checked cell by cell before its first run: the 0.5 cell does not run and leave the 4:8 one behind
    code, err, out = _refused(["grid", "--config", str(preset), "--model", str(narrow), "--runs-dir", str(runs),
                               "--methods", "wanda", "--sparsities", "0.5,4:8", "--out", str(tmp_path / "t")])
    assert code == 2 and len(err) == 1 and "o_proj reads 60 columns" in err[0] and out == ""
    assert not runs.exists() or not any(runs.iterdir())
    assert not (tmp_path / "t.csv").exists()
