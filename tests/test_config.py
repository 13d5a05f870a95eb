"""Bad input gets a ConfigError naming the field and the fix."""
from __future__ import annotations

import pytest

from ebft_engine import ConfigError, RunConfig
from ebft_engine.config import PruneConfig


@pytest.mark.parametrize("overrides,field,words", [
    ({"prune.sparsity": 1.0}, "prune.sparsity", "outside \\[0, 1\\)"),
    ({"prune.sparsity": -0.1}, "prune.sparsity", "outside"),
    ({"prune.sparsity": "lots"}, "prune.sparsity", "not a number"),
    ({"prune.pattern": "4:2"}, "prune.pattern", "N<M|0 < N < M"),
    ({"prune.pattern": "2:2"}, "prune.pattern", "0 < N < M"),
    ({"prune.pattern": "banana"}, "prune.pattern", "neither 'unstructured', 'structured' nor N:M"),
    ({"prune.pattern": "2:4", "prune.sparsity": 0.7}, "prune.sparsity", "disagrees with pattern 2:4"),
    ({"prune.method": "random"}, "prune.method", "unknown method"),
    ({"calib.nsamples": 0}, "calib.nsamples", "below 1"),
    ({"calib.nsamples": 4, "ebft.batch_size": 8}, "ebft.batch_size", "larger than calib.nsamples"),
    ({"calib.source": "bookcorpus"}, "calib.source", "unknown calibration source"),
    ({"calib.source": "file:"}, "calib.source", "unknown calibration source"),
    ({"eval.source": "file:a.txt", "calib.source": "file:a.txt"}, "calib.source", "contaminate"),
    ({"eval.windows": 0}, "eval.windows", "below 1"),
    ({"ebft.lr": 0}, "ebft.lr", "not above 0"),
    ({"ebft.epochs": 1.5}, "ebft.epochs", "not a whole number"),
    ({"baselines": "wanda,lora-ish"}, "baselines", "unknown method 'lora-ish'"),
    ({"device": "tpu"}, "device", "unknown device"),
    ({"dtype": "int8"}, "dtype", "unknown dtype"),
    ({"seed": -1}, "seed", "below 0"),
])
def test_bad_values_name_field_and_fix(overrides, field, words):
    with pytest.raises(ConfigError, match=words) as info:
        RunConfig().with_overrides(overrides)
    assert info.value.field == field
    assert info.value.fix  # every error says what to do


def test_a_config_error_survives_pickling_whole():
    """It crosses process boundaries (multiprocessing, a ZeroGPU worker): the default pickling of an exception
    re-calls __init__ with the one sentence, which ConfigError's three parts cannot take."""
    import pickle

    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides({"prune.sparsity": 1.0})
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is ConfigError and str(again) == str(info.value)
    assert (again.field, again.problem, again.fix) == (info.value.field, info.value.problem, info.value.fix)


def test_unknown_key_is_rejected_with_the_known_ones():
    with pytest.raises(ConfigError, match="prune.sparsty: is not a known field.*sparsity"):
        RunConfig.from_dict({"prune": {"sparsty": 0.5}})


def test_nm_pattern_implies_sparsity():
    assert PruneConfig(pattern="2:4").sparsity == 0.5
    assert PruneConfig(pattern="4:8", sparsity=0.5).nm == (4, 8)
    assert PruneConfig().sparsity == 0.5


def test_yaml_round_trip_and_strings_from_the_cli(tmp_path):
    config = RunConfig().with_overrides({"ebft.lr": "2e-4", "calib.nsamples": "64", "baselines": "wanda,magnitude"})
    assert config.ebft.lr == 2e-4 and config.calib.nsamples == 64 and config.baselines == ("wanda", "magnitude")
    path = tmp_path / "preset.yaml"
    path.write_text(config.to_yaml())
    assert RunConfig.from_yaml(path) == config


def test_bad_preset_files(tmp_path):
    with pytest.raises(ConfigError, match="no such preset"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(bad)
    python_tag = tmp_path / "tag.yaml"
    python_tag.write_text("model: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(ConfigError):  # the safe loader refuses to build Python objects
        RunConfig.from_yaml(python_tag)


def test_presets_load():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "assets" / "presets").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"smollm2-demo", "llama-7b-paper"}
    for p in presets:
        RunConfig.from_yaml(p)
    paper = RunConfig.from_yaml(presets[[p.stem for p in presets].index("llama-7b-paper")])
    assert (paper.calib.source, paper.calib.nsamples, paper.calib.seqlen) == ("c4", 256, 1024)
    assert (paper.ebft.lr, paper.ebft.epochs, paper.ebft.batch_size, paper.ebft.weight_decay) == (2e-4, 10, 8, 0.1)
    assert paper.eval.seqlen == 2048


@pytest.mark.parametrize("overrides,sparsity", [
    ({"prune.method": "llm-pruner"}, 0.2),
    ({"prune.pattern": "3:8"}, 0.625),
    ({"prune.pattern": "1:4"}, 0.75),
    ({"prune.sparsity": 0.7, "prune.method": "sparsegpt"}, 0.7),
])
def test_a_sparsity_never_chosen_follows_the_method_and_pattern(overrides, sparsity):
    """The CLI builds its config as defaults plus flags: `--method llm-pruner` alone must prune LLM-Pruner's 20%
    (it pruned 50%), `--pattern 3:8` alone 62.5% (it was refused), as the same config written whole does."""
    assert RunConfig().with_overrides(overrides).prune.sparsity == pytest.approx(sparsity)
    assert RunConfig().with_overrides({"prune.sparsity": 0.3}).with_overrides(
        {"prune.method": "sparsegpt"}).prune.sparsity == 0.3  # a chosen sparsity stays


def test_the_cli_prunes_llm_pruners_default_share():
    from ebft_engine.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--method", "llm-pruner"])
    assert config_from_args(args).prune.sparsity == 0.2
    args = build_parser().parse_args(["run", "--pattern", "3:8"])
    assert config_from_args(args).prune.sparsity == pytest.approx(0.625)


def test_the_ebft_batch_is_checked_only_when_a_recovery_trains_blocks():
    """LoRA alone never uses ebft.batch_size: a calibration set smaller than it is fine then."""
    config = RunConfig().with_overrides({"calib.nsamples": 4, "recoveries": ["lora"]})
    assert config.calib.nsamples == 4 < config.ebft.batch_size
    with pytest.raises(ConfigError, match="larger than calib.nsamples"):
        config.with_overrides({"recoveries": ["lora", "ebft-gp"]})
