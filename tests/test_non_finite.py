"""A run that cannot be right says so: a perplexity or hidden state that is not finite (float16's range
overflowed) fails the run with one line naming the cause and the fix, keeps every finite number, and no NaN
ever reaches a JSON file."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from ebft_engine import ConfigError, EbftError, run
from ebft_engine.pruners import mask as pruners
from ebft_engine.cli import main
from ebft_engine.config import DTYPES
from ebft_engine.device import FLOAT16_MAX, Precision, non_finite
from ebft_engine.models import byte_tokenizer


def _strict(path: Path):
    """The file parsed as JSON proper: NaN, Infinity and -Infinity are not JSON."""
    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def overflowing_model_dir(tmp_path, tiny_llama):
    """The tiny LLaMA with its MLP weights scaled up 200x: every weight fits in float16 (|w| < 20), but block 0's
    output reaches about 2e5, beyond float16's largest value."""
    with torch.no_grad():
        for block in tiny_llama.model.layers:
            for linear in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                linear.weight.mul_(200)
        hidden = tiny_llama(torch.randint(0, 256, (1, 64)), output_hidden_states=True).hidden_states
    assert max(p.abs().max().item() for p in tiny_llama.parameters()) < 100
    assert hidden[1].abs().max().item() > 2 * FLOAT16_MAX  # the premise: activations leave float16's range
    path = tmp_path / "overflowing"
    tiny_llama.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_float16_overflow_fails_the_run_in_one_line_and_the_fix_works(tiny_run_config, overflowing_model_dir,
                                                                        tmp_path):
    preset = tmp_path / "run.yaml"
    preset.write_text(tiny_run_config.with_overrides({"model": str(overflowing_model_dir), "ebft.epochs": 1,
                                                      "json_out": str(tmp_path / "out.json")}).to_yaml())
    out = io.StringIO()
    code = main(["run", "--config", str(preset), "--dtype", "float16", "--quiet"], out=out)
    text = out.getvalue()
    assert code == 2, text  # a configuration the model cannot run in: bad input, not "finished"
    errors = [line for line in text.splitlines() if line.startswith("[error]")]
    assert len(errors) == 1, text
    assert errors[0].startswith("[error] dtype: ") and "float16" in errors[0] and "--dtype bfloat16" in errors[0]
    assert "nan" not in text.lower() and "status: failed" in text
    run_dir = next((tmp_path / "runs").iterdir())
    summary = _strict(run_dir / "summary.json")
    assert summary["status"] == "failed" and summary["ppl"] == {}
    assert summary["error"]["field"] == "dtype"
    assert _strict(tmp_path / "out.json")["status"] == "failed"
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"events.jsonl holds {token}"))
    # every dtype the message offers is one the field accepts, and runs this model to the end
    offered = [d for d in DTYPES if f"--dtype {d}" in errors[0]]
    assert offered and "float16" not in offered
    for dtype in offered:
        assert main(["run", "--config", str(preset), "--dtype", dtype, "--quiet"], out=io.StringIO()) == 0


def test_an_overflow_after_pruning_keeps_the_finished_numbers(tiny_run_config, monkeypatch):
    """The dense model fits float16, a pruned block's output does not (a pruning step that leaves block 0's MLP
    weights 200x larger, as in the model above): the run fails on dtype at that block's propagation, and the
    dense perplexity it had measured stays in summary.json."""
    real = pruners.MaskPruner.prune

    def blowing_up(self, run, block, *args, **kwargs):
        masks = real(self, run, block, *args, **kwargs)
        if block is run.adapter.blocks[0]:
            with torch.no_grad():
                for linear in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                    linear.weight.mul_(200)
        return masks

    monkeypatch.setattr(pruners.MaskPruner, "prune", blowing_up)
    events = list(run(tiny_run_config.with_overrides({"dtype": "float16", "baselines": ["wanda"]})))
    summary = events[-1].summary
    assert events[-1].status == "failed"
    (error,) = [e.text for e in events if e.kind == "notice" and e.level == "error"]
    assert error.startswith("dtype: the calibration output of block 0 of wanda is not finite"), error
    assert set(summary["ppl"]) == {"dense"} and summary["ppl"]["dense"] == pytest.approx(
        next(e.ppl for e in events if e.kind == "eval_finished"))
    on_disk = _strict(Path(events[0].run_dir) / "summary.json")
    assert on_disk["ppl"] == summary["ppl"] and on_disk["error"]["field"] == "dtype"


def test_the_cause_is_named_only_where_float16_is_in_play(monkeypatch):
    cpu16 = Precision(torch.device("cpu"), torch.float16, torch.bfloat16)
    error = non_finite(cpu16, "the output of block 0")
    assert isinstance(error, ConfigError) and error.field == "dtype"
    assert "--dtype bfloat16" in error.fix and "--dtype float32" in error.fix
    # a GPU without native bfloat16 (a T4, sm75: dtype auto picks float16) is offered float32 only
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    old_gpu = Precision(torch.device("cuda"), torch.float16, torch.float16)
    error = non_finite(old_gpu, "the output of block 0")
    assert isinstance(error, ConfigError) and "--dtype bfloat16" not in error.fix and "--dtype float32" in error.fix
    for precision in (Precision(torch.device("cpu"), torch.float32, None),
                      Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16)):
        error = non_finite(precision, "the output of block 0")  # no float16: not blamed on float16
        assert isinstance(error, EbftError) and not isinstance(error, ConfigError)
        assert "float16's range" not in str(error)


def test_json_files_are_strict_and_store_non_finite_values_as_null(tmp_path):
    from ebft_engine.events import BlockFinished, StepLoss
    from ebft_engine.record import RunRecord, read_events, write_json_atomic

    write_json_atomic(tmp_path / "s.json", {"ppl": {"a": float("nan"), "b": 2.5}, "losses": [float("inf"), 1],
                                            "np": __import__("numpy").float32("nan"), "flag": True})
    assert _strict(tmp_path / "s.json") == {"ppl": {"a": None, "b": 2.5}, "losses": [None, 1], "np": None,
                                            "flag": True}
    record = RunRecord(tmp_path / "runs", "r1")
    record.append(StepLoss("ebft", 0, 1, 4, float("nan"), 1e-3))
    record.append(BlockFinished("ebft", 0, 2, float("inf"), 0.5, 1.0, 0.5))
    record.close()
    for line in (record.dir / "events.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"events.jsonl holds {token}"))
    step, block = read_events(record.dir)
    assert step.loss is None and block.initial_loss is None and block.final_loss == 0.5


def test_self_generated_calibration_refuses_non_finite_scores(overflowing_model_dir):
    """Generating calibration text in float16 (a GPU without bfloat16; CPU float16 here) from the model above:
    the same one-line dtype error, not an internal error from sampling NaN probabilities."""
    from transformers import AutoModelForCausalLM

    from ebft_engine import data

    model = AutoModelForCausalLM.from_pretrained(overflowing_model_dir, dtype=torch.float16).eval()
    half = Precision(torch.device("cpu"), torch.float16, torch.float16)
    with pytest.raises(ConfigError) as info:
        data.self_generated(model, byte_tokenizer(), 4, 16, seed=0, precision=half)
    assert info.value.field == "dtype" and "float16's range" in info.value.problem
    assert not data.self_cache_path(model, 4, 16, 0).exists()  # nothing cached from it
