"""Resume: a run SIGKILLed at any point continues from its run folder and ends exactly where an uninterrupted
run ends (same masks, same perplexities); cancelled and failed runs resume too; bad resumes are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebft_engine import ConfigError, RunConfig, resume, run
from ebft_engine.record import run_status

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture
def four_block_config(tmp_path, text_files):
    """The tiny LLaMA with four blocks (so a kill can land between blocks), a baseline and a saved model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft_engine.models import byte_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=False))
    path = tmp_path / "tiny4"
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    calib, evaluation = text_files
    return RunConfig.from_dict({
        "model": str(path), "prune": {"method": "wanda", "sparsity": 0.5},
        "calib": {"source": f"file:{calib}", "nsamples": 8, "seqlen": 32},
        "ebft": {"epochs": 3, "lr": 1e-3, "batch_size": 4},
        "eval": {"source": f"file:{evaluation}", "seqlen": 64, "windows": 4},
        "baselines": ["magnitude", "wanda"], "device": "cpu", "runs_dir": str(tmp_path / "runs"),
    })


def _uninterrupted(config: RunConfig, tmp_path: Path) -> dict:
    config = config.with_overrides({"runs_dir": str(tmp_path / "reference"),
                                    "save_model": str(tmp_path / "reference-model")})
    events = list(run(config))
    assert events[-1].status == "finished"
    return events[-1].summary


def _kill_at(config: RunConfig, tmp_path: Path, *point: str) -> Path:
    """Run in a subprocess that SIGKILLs itself at ``point``; return its run folder."""
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(config.to_dict()))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kill_after.py"), str(cfg_file), *point], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"not killed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    (run_dir,) = Path(config.runs_dir).iterdir()
    assert run_status(run_dir) == "interrupted"
    return run_dir


def _assert_same_result(summary: dict, reference: dict, model_dir: Path, reference_model: Path) -> None:
    assert summary["status"] == "finished"
    assert list(summary["ppl"]) == list(reference["ppl"])
    for label, ppl in reference["ppl"].items():
        assert summary["ppl"][label] == pytest.approx(ppl, rel=1e-3), label
    assert summary["mask_sha256"] == reference["mask_sha256"]
    assert [b["index"] for b in summary["blocks"]] == [b["index"] for b in reference["blocks"]]
    from safetensors.torch import load_file

    ours, theirs = load_file(model_dir / "model.safetensors"), load_file(reference_model / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name] == 0, theirs[name] == 0), name  # the same masks
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


# Kill points: between EBFT blocks, inside an EBFT block's training, inside a baseline's block pass, and during
# the evaluation of the EBFT model (all of its blocks done).
KILL_POINTS = {
    "after-ebft-block-1": ("block_finished", "ebft", "1"),
    "mid-training-block-2": ("step_loss", "ebft", "2", "3"),
    "in-wanda-baseline": ("block_started", "wanda", "2"),
    "during-ebft-eval": ("phase_started", "ebft", "-1"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS), ids=list(KILL_POINTS))
def test_sigkill_then_resume_matches_an_uninterrupted_run(four_block_config, tmp_path, point):
    reference = _uninterrupted(four_block_config, tmp_path)
    config = four_block_config.with_overrides({"save_model": str(tmp_path / "model")})
    run_dir = _kill_at(config, tmp_path, *KILL_POINTS[point])
    killed = json.loads((run_dir / "summary.json").read_text())
    assert killed["status"] == "running" and "dense" in killed["ppl"]
    events = list(resume(run_dir))
    assert events[0].resumed and events[-1].status == "finished", [e for e in events if e.kind == "notice"]
    _assert_same_result(events[-1].summary, reference, tmp_path / "model", tmp_path / "reference-model")
    assert not (run_dir / "checkpoint").exists()  # a finished run gives its checkpoint space back
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    if point == "after-ebft-block-1":  # the finished blocks are restored, not trained again
        trained = {e.block for e in events if e.kind == "step_loss"}
        assert trained == {2, 3}
        assert not any(e.kind == "phase_started" and e.phase == "prune" for e in events)  # baselines kept


def test_resume_from_the_command_line(four_block_config, tmp_path):
    run_dir = _kill_at(four_block_config, tmp_path, "block_finished", "ebft", "0")
    proc = subprocess.run([sys.executable, "-m", "ebft_engine", "run", "--resume", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming run {run_dir.name}" in proc.stdout and "| ebft |" in proc.stdout
    assert "restored from the checkpoint" in proc.stdout
    # resuming a finished run, or with other flags, is refused in one line
    again = subprocess.run([sys.executable, "-m", "ebft_engine", "run", "--resume", str(run_dir)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already finished" in again.stderr and "Traceback" not in again.stderr
    flags = subprocess.run([sys.executable, "-m", "ebft_engine", "run", "--resume", str(run_dir), "--epochs", "9"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert flags.returncode == 2 and "drop --epochs" in flags.stderr


def test_a_cancelled_run_resumes(four_block_config, tmp_path):
    import threading

    reference = _uninterrupted(four_block_config, tmp_path)
    cancel = threading.Event()
    config = four_block_config.with_overrides({"save_model": str(tmp_path / "model")})
    events = []
    for event in run(config, cancel):
        events.append(event)
        if event.kind == "step_loss" and event.block == 1 and event.step == 2:
            cancel.set()
    assert events[-1].status == "cancelled"
    assert any("--resume" in e.text for e in events if e.kind == "notice")
    run_dir = Path(events[0].run_dir)
    assert (run_dir / "checkpoint" / "ebft" / "block-0000.pt").is_file()
    events = list(resume(run_dir))
    _assert_same_result(events[-1].summary, reference, tmp_path / "model", tmp_path / "reference-model")


def test_resume_refuses_what_it_cannot_continue(tmp_path, tiny_run_config):
    with pytest.raises(ConfigError, match="not a run folder"):
        next(resume(tmp_path))
    events = list(run(tiny_run_config))
    with pytest.raises(ConfigError, match="already finished"):
        next(resume(events[0].run_dir))


def test_checkpoint_packing_is_exact():
    from ebft_engine.checkpoint import pack, unpack

    w = torch.randn(33, 17)
    w[w.abs() < 0.7] = 0
    for t in (w, w.to(torch.bfloat16), w.to(torch.float16), torch.randn(17)):
        assert torch.equal(unpack(pack(t)), t)


def test_owl_and_global_propagation_resume_to_the_same_result(four_block_config, tmp_path):
    config = four_block_config.with_overrides({"baselines": "owl-wanda,dsnot", "recoveries": "ebft,ebft-gp"})
    reference = list(run(config.with_overrides({"runs_dir": str(tmp_path / "reference")})))[-1].summary
    run_dir = _kill_at(config, tmp_path, "block_started", "ebft-gp", "2")
    summary = list(resume(run_dir))[-1].summary
    assert summary["status"] == "finished"
    assert summary["mask_sha256"] == reference["mask_sha256"]
    assert summary["sparsity_profile"] == reference["sparsity_profile"]
    for label, ppl in reference["ppl"].items():
        assert summary["ppl"][label] == pytest.approx(ppl, rel=1e-3), label
    assert [(b["label"], b["index"]) for b in summary["blocks"]] == [(b["label"], b["index"])
                                                                      for b in reference["blocks"]]


def test_a_structured_run_resumes_with_the_same_smaller_blocks(four_block_config, tmp_path):
    """Checkpoints of structurally pruned blocks carry which heads and channels they kept: a killed run resumes
    into the same smaller model."""
    config = four_block_config.with_overrides({
        "prune.method": "llm-pruner", "prune.pattern": "structured", "prune.sparsity": 0.25, "prune.keep_first": 1,
        "prune.keep_last": 1, "prune.taylor_samples": 4, "prune.taylor_seqlen": 16, "baselines": ["llm-pruner"]})
    reference = _uninterrupted(config, tmp_path)
    run_dir = _kill_at(config.with_overrides({"save_model": str(tmp_path / "model")}), tmp_path,
                       "block_started", "ebft", "2")
    events = list(resume(run_dir))
    assert any("blocks 0-1 restored" in e.text for e in events if e.kind == "notice")
    summary = events[-1].summary
    _assert_same_result(summary, reference, tmp_path / "model", tmp_path / "reference-model")
    assert summary["structure"] == reference["structure"] and summary["params"] == reference["params"]


def test_resume_accepts_the_flags_that_say_where_output_goes(tiny_run_config, tmp_path):
    """Issue #11: `--resume RUN --json-out s.json` was refused, so a script could not collect a resumed run's
    summary. --json-out and --quiet change nothing the run computes; the flags that do are still refused."""
    import contextlib
    import io
    import threading

    from ebft_engine.cli import main

    cancel = threading.Event()
    events = []
    for event in run(tiny_run_config, cancel):
        events.append(event)
        if event.kind == "step_loss" and event.block == 1 and event.step == 2:
            cancel.set()
    assert events[-1].status == "cancelled"
    run_dir = Path(events[0].run_dir)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--resume", str(run_dir), "--json-out", str(tmp_path / "s.json"), "--quiet"], out=out)
    assert code == 0, err.getvalue() + out.getvalue()
    collected = json.loads((tmp_path / "s.json").read_text())
    assert collected["status"] == "finished" and set(collected["ppl"]) == {"dense", "ebft"}
    assert collected == json.loads((run_dir / "summary.json").read_text())
    assert "resumed with" not in out.getvalue()  # nothing the remaining blocks compute from was changed
    assert "== ebft" not in out.getvalue()  # --quiet held
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["run", "--resume", str(run_dir), "--runs-dir", str(tmp_path), "--json-out", "x.json"]) == 2
    assert err.getvalue().strip().splitlines() == [
        "error: --resume continues a run with the settings it was started with; drop --runs-dir (or start a new run "
        "with them); only --batch-size, --activations, --json-out and --quiet may be given with it"]


def _save_tiny(path: Path, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft_engine.models import byte_tokenizer

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def _stopped_after_ebft_block_1(config: RunConfig) -> Path:
    import threading

    cancel = threading.Event()
    events = []
    for event in run(config, cancel):
        events.append(event)
        if event.kind == "block_finished" and event.label == "ebft" and event.block == 1:
            cancel.set()
    assert events[-1].status == "cancelled"
    return Path(events[0].run_dir)


def test_resume_refuses_a_model_rebuilt_with_more_blocks(four_block_config, tmp_path, capsys):
    """The model folder was rebuilt with 6 blocks after the run started on its 4: resuming would put back 2
    finished blocks of one model and go on with another's. Refused before any event, in one line, exit 2."""
    from ebft_engine.cli import main
    from ebft_engine.pipeline import resumable

    config = four_block_config.with_overrides({"baselines": []})
    run_dir = _stopped_after_ebft_block_1(config)
    assert json.loads((run_dir / "model.json").read_text())["config"]["num_hidden_layers"] == 4
    _save_tiny(Path(config.model), layers=6, seed=0)
    with pytest.raises(ConfigError) as info:
        resumable(run_dir)
    assert info.value.field == "model" and "num_hidden_layers: 4 then, 6 now" in info.value.problem
    assert "start a new run" in info.value.fix
    capsys.readouterr()  # what the run printed so far
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "cancelled"  # the folder untouched


def test_resume_refuses_the_same_shapes_with_new_weights_and_takes_a_copy_of_the_old(four_block_config, tmp_path):
    """Same config, same shapes, other weights: refused, naming the file. A byte-identical copy of the original
    (new modification times) is the same model: the run resumes and finishes."""
    import shutil

    from ebft_engine.pipeline import resumable

    config = four_block_config.with_overrides({"baselines": []})
    model_dir = Path(config.model)
    run_dir = _stopped_after_ebft_block_1(config)
    backup = tmp_path / "backup"
    shutil.copytree(model_dir, backup)
    _save_tiny(model_dir, layers=4, seed=1)
    with pytest.raises(ConfigError) as info:
        resumable(run_dir)
    assert info.value.field == "model" and "its files differ: model.safetensors" in info.value.problem
    with pytest.raises(ConfigError, match="^model: "):
        next(resume(run_dir))
    shutil.rmtree(model_dir)
    shutil.copytree(backup, model_dir)  # the same bytes, new files
    events = list(resume(run_dir))
    assert events[-1].status == "finished", [e.text for e in events if e.kind == "notice"]
    assert any("blocks 0-1 restored" in e.text for e in events if e.kind == "notice")


def test_learned_masks_resume_after_a_kill_mid_block_to_the_same_result(four_block_config, tmp_path):
    """ebft-mask killed inside block 2's training redoes that block from its prior and learns the same masks."""
    config = four_block_config.with_overrides({"baselines": "wanda", "recoveries": "ebft-mask"})
    reference = list(run(config.with_overrides({"runs_dir": str(tmp_path / "reference")})))[-1].summary
    run_dir = _kill_at(config, tmp_path, "step_loss", "ebft-mask", "2", "3")
    events = list(resume(run_dir))
    summary = events[-1].summary
    assert summary["status"] == "finished"
    assert {e.block for e in events if e.kind == "step_loss"} == {2, 3}
    assert summary["mask_sha256"] == reference["mask_sha256"]
    assert summary["mask_sha256"]["ebft-mask"] != summary["mask_sha256"]["wanda"]  # the masks were learned
    for label, ppl in reference["ppl"].items():
        assert summary["ppl"][label] == pytest.approx(ppl, rel=1e-3), label
