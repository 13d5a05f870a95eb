"""On a Space the lab takes no local paths, no files, saves nothing and bounds every size."""
from __future__ import annotations

import pytest

from ebft_engine import ConfigError, EbftError
from lab import policy
from lab.controls import config_to_values, values_to_config
from lab.panels.preset import load_preset, preset_names


@pytest.mark.parametrize("overrides,field", [
    ({"model": "/models/llama"}, "model"),
    ({"model": "./llama"}, "model"),
    ({"model": "weights.gguf"}, "model"),
    ({"calib.source": "file:/etc/passwd"}, "calib.source"),
    ({"eval.source": "file:notes.txt"}, "eval.source"),
    ({"save_model": "out"}, "save_model"),
    ({"calib.nsamples": 1000}, "calib.nsamples"),
    ({"ebft.epochs": 50}, "ebft.epochs"),
    ({"eval.windows": None}, "eval.windows"),
])
def test_spaces_refuses(overrides, field):
    config = load_preset("smollm2-spaces").with_overrides(overrides)
    with pytest.raises(ConfigError) as info:
        policy.check(config, spaces=True)
    assert info.value.field == field


@pytest.mark.parametrize("field", ["calib.source", "eval.source"])
def test_spaces_file_refusal_offers_only_the_fields_own_sources(field):
    """The fix a refusal offers must pass that field's validation (self is calibration only, ptb evaluation only)."""
    config = load_preset("smollm2-spaces").with_overrides({field: "file:notes.txt"})
    with pytest.raises(ConfigError) as info:
        policy.check(config, spaces=True)
    offered = [v.strip() for v in info.value.fix.removeprefix("use ").split(",")]
    assert offered
    for value in offered:
        policy.check(config.with_overrides({field: value}), spaces=True)  # valid for the field, and on the Space


def test_spaces_accepts_presets_and_hub_ids(hub_configs):
    config = load_preset("smollm2-spaces")
    assert policy.check(config, spaces=True) is config
    policy.check(config.with_overrides({"model": "tiny-random"}), spaces=True)
    policy.check(config.with_overrides({"model": "HuggingFaceTB/SmolLM2-135M"}), spaces=True)
    local = load_preset("smollm2-demo").with_overrides({"save_model": "out", "model": "HuggingFaceTB/SmolLM2-360M"})
    assert policy.check(local, spaces=False) is local  # a workstation allows it all


@pytest.mark.parametrize("gpu,slot", [(False, "15 minutes on its 2 CPU cores"), (True, "300 s GPU slot")])
def test_spaces_refuses_a_model_too_large_to_finish(hub_configs, monkeypatch, gpu, slot):
    """The bound is counted from the model's config (no weight read): SmolLM2-135M is under it, SmolLM2-360M over
    it, in one line naming the field, the count, the Space's time and the fix."""
    monkeypatch.setenv("SPACE_ID", "someone/ebft-lab")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true" if gpu else "")
    assert policy.SPACES_MAX_PARAMS > 134_515_008  # SmolLM2-135M, the Space's own preset model
    config = load_preset("smollm2-spaces").with_overrides({"model": "HuggingFaceTB/SmolLM2-360M"})
    with pytest.raises(ConfigError) as info:
        policy.check(config)
    assert info.value.field == "model"
    assert str(info.value) == (f"model: HuggingFaceTB/SmolLM2-360M has 362M parameters, more than this Space runs "
                               f"(144M: a larger run would not finish within {'the ' if gpu else ''}{slot}); "
                               "pick smollm2-135m or a hub model of at most 144M parameters, or run the lab locally")
    with pytest.raises(EbftError, match="cannot read 'nobody/nothing' from the hub"):  # the engine's sentence
        policy.check(config.with_overrides({"model": "nobody/nothing"}))


def test_the_parameter_bound_is_the_measured_arithmetic():
    """lab/policy.py's comment, recomputed: the demo's measured phases scaled to SPACES_LIMITS, x1.25, into 900 s."""
    at_limits = (38 + 57 + 2 * 31 + 4 * 129) * 1.25
    assert at_limits == 841.25
    assert policy.SPACES_MAX_PARAMS == int(policy.SPACES_CPU_SECONDS * 134_515_008 / at_limits) == 143_909_072
    load = 38 * 1.25 * policy.SPACES_MAX_PARAMS / 134_515_008  # no faster on a GPU
    speedup_needed = (policy.SPACES_CPU_SECONDS - load) / (policy.ZERO_GPU_SECONDS - load)
    assert speedup_needed < 3.5  # what a ZeroGPU run of the largest allowed model asks of the GPU


def _control_paths() -> list[str]:
    import gradio as gr

    from lab.panels import create_setup_panels

    with gr.Blocks():
        return list(create_setup_panels(load_preset("tiny-random"), spaces=False))


def test_every_preset_round_trips_through_the_controls():
    paths = _control_paths()
    for name in preset_names():
        config = load_preset(name)
        again = values_to_config(config_to_values(config, paths), base=config)
        assert again.with_overrides({"runs_dir": config.runs_dir}) == config


def test_the_sparsity_slider_follows_an_n_m_pattern_and_a_mismatch_is_refused():
    """The lab ran 2:4 at 50% while its slider showed 70%: now the slider follows the pattern, and a slider moved
    away from it afterwards is refused with the engine's words instead of being dropped silently."""
    import gradio as gr

    from ebft_engine import RunConfig
    from lab.panels.prune import sparsity_for_pattern

    assert sparsity_for_pattern("2:4") == 0.5 and sparsity_for_pattern("1:4") == 0.75
    assert isinstance(sparsity_for_pattern("unstructured"), type(gr.skip()))
    values = config_to_values(RunConfig.from_dict({"model": "tiny-random"}), _control_paths())
    values["prune.pattern"] = "2:4"
    values["prune.sparsity"] = 0.7
    with pytest.raises(ConfigError, match="prune.sparsity: 0.7 disagrees with pattern 2:4"):
        values_to_config(values)
    values["prune.sparsity"] = sparsity_for_pattern("2:4")
    assert values_to_config(values).prune.sparsity == 0.5


def test_the_time_estimate_reproduces_the_measured_runs_it_comes_from():
    """run_seconds at SmolLM2-135M's size: the demo preset is the measured 255 s (x MARGIN), the Space's preset at
    SPACES_LIMITS the 673 s the parameter bound is built on; each baseline, recovery and epoch adds to it."""
    n = policy.DEMO_PARAMS
    demo, spaces = load_preset("smollm2-demo"), load_preset("smollm2-spaces")
    assert policy.run_seconds(demo, n) == 255 * 1.25
    at_limits = spaces.with_overrides({"calib.nsamples": 64, "ebft.epochs": 4})
    assert policy.run_seconds(at_limits, n) == 673 * 1.25 == policy.SECONDS_PER_PARAM * n
    more = [spaces.with_overrides({"baselines": "wanda,magnitude"}),
            spaces.with_overrides({"recoveries": "ebft,ebft-gp"}), spaces.with_overrides({"ebft.epochs": 3})]
    assert all(policy.run_seconds(c, n) > policy.run_seconds(spaces, n) for c in more)
    alps = spaces.with_overrides({"baselines": "wanda,alps"})  # README: ALPS pruned SmolLM2-135M in 2,429 s
    assert policy.run_seconds(alps, n) - policy.run_seconds(spaces, n) == (2429 + 19) * 1.25


@pytest.mark.parametrize("overrides,field,fix,dropping", [
    ({"baselines": "wanda,alps"}, "baselines", "drop alps from baselines, or run", {"baselines": ["alps"]}),
    ({"baselines": "wanda,sparsegpt,magnitude", "recoveries": "ebft,ebft-gp"}, "baselines",
     "drop sparsegpt from baselines, or run", {"baselines": ["sparsegpt"]}),
    ({"calib.nsamples": 64, "ebft.epochs": 4, "baselines": "wanda,sparsegpt,magnitude", "recoveries": "ebft,ebft-gp"},
     "baselines", "drop sparsegpt, magnitude from baselines and ebft-gp from recoveries, or run",
     {"baselines": ["sparsegpt", "magnitude"], "recoveries": ["ebft-gp"]}),
    ({"prune.method": "alps", "baselines": "alps"}, "prune.method",
     "prune with a faster method than alps (e.g. wanda)", None),
    ({"calib.source": "wikitext2", "calib.self_nsamples": 256}, "calib.nsamples",
     "use fewer calibration samples (calib.nsamples, calib.self_nsamples) or EBFT epochs", None),
])
def test_spaces_refuses_a_workload_that_would_not_finish_saying_what_to_drop(hub_configs, monkeypatch, overrides,
                                                                             field, fix, dropping):
    """A model under the bound can still ask too much: many variants, ALPS (2,429 s on SmolLM2-135M at 70%), more
    tokens. The estimate grows with them, and the refusal is one line naming what to drop; without it the run
    is within the Space's time."""
    monkeypatch.setenv("SPACE_ID", "someone/ebft-lab")
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    config = load_preset("smollm2-spaces").with_overrides({"model": "HuggingFaceTB/SmolLM2-135M", **overrides})
    with pytest.raises(ConfigError) as info:
        policy.check(config)
    assert info.value.field == field and info.value.fix.startswith(fix) and "\n" not in str(info.value)
    assert "would not finish within 15 minutes on its 2 CPU cores" in info.value.problem
    if dropping:
        kept = {k: [v for v in getattr(config, k) if v not in dropping.get(k, [])] for k in ("baselines",
                                                                                           "recoveries")}
        fixed = config.with_overrides({k: ",".join(v) for k, v in kept.items()})
        assert policy.check(fixed) is fixed


def test_a_small_model_may_run_a_slow_method_on_a_space():
    """The estimate scales with the model: ALPS on the tiny random model is seconds."""
    config = load_preset("smollm2-spaces").with_overrides({"model": "tiny-random", "baselines": "wanda,alps"})
    assert policy.check(config, spaces=True) is config
