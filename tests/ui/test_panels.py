"""The setup panels' controls against the run config, without a browser: every control is keyed by a real config
field, a config goes to the controls and back unchanged, and a fixture in which every value differs makes any two
controls wired the wrong way round visible."""
from __future__ import annotations

import itertools

import gradio as gr
import pytest

from ebft_engine import ConfigError, EbftError, RunConfig
from ebft_engine.config import method_ok
from lab import policy
from lab.controls import ControlValues, Controls, config_to_values, field_value, values_to_config
from lab.panels import create_setup_panels
from lab.panels.preset import load_preset, preset_filler
from lab.panels.prune import method_choices

# Non-default in every field a control covers, and no two controls showing the same value: so a config that comes
# back with two fields exchanged cannot equal it. Structured pruning is the one pattern whose sparsity is free and
# whose method is not the default.
RICH = RunConfig().with_overrides({
    "model": "tiny-random", "prune.method": "llm-pruner", "prune.pattern": "structured", "prune.sparsity": 0.35,
    "baselines": ["llm-pruner"], "recoveries": ["ebft-gp", "lora"], "prune.dsnot_init": "magnitude",
    "prune.dsnot_layers": "all", "prune.alps_iterations": 77, "prune.owl_lambda": 0.12, "prune.owl_m": 6.5,
    "prune.keep_first": 1, "prune.keep_last": 14, "prune.taylor_samples": 12, "prune.taylor_seqlen": 33, "calib.source": "wikitext2",
    "calib.nsamples": 48, "calib.seqlen": 96, "calib.self_nsamples": 5, "ebft.epochs": 3, "ebft.lr": 0.004,
    "ebft.batch_size": 6, "lora.rank": 7, "lora.lr": 0.0003, "lora.budget": "epochs", "eval.source": "c4",
    "eval.seqlen": 200, "eval.windows": 9, "eval.zeroshot": ["boolq", "rte"], "eval.zeroshot_limit": 11,
    "seed": 13, "save_model": "out/recovered",
})

# What the page shows for each field: (the accordion it sits in, its label). The specification the panels are
# checked against: a key given to the wrong component shows up here.
LABELS = {
    "model": (None, "Model"),
    "prune.method": ("Pruning", "Method (EBFT starts from it)"),
    "prune.pattern": ("Pruning", "Pattern"),
    "prune.sparsity": ("Pruning", "Sparsity"),
    "baselines": ("Pruning", "Baselines to compare"),
    "recoveries": ("Pruning", "Recoveries"),
    "prune.dsnot_init": ("Pruning", "DSnoT refines"),
    "prune.dsnot_layers": ("Pruning", "DSnoT layers"),
    "prune.alps_iterations": ("Pruning", "ALPS: ADMM iterations at most"),
    "prune.owl_lambda": ("Pruning", "OWL λ (sparsity spread)"),
    "prune.owl_m": ("Pruning", "OWL M (outlier threshold)"),
    "prune.keep_first": ("Pruning", "Structured: keep first blocks"),
    "prune.keep_last": ("Pruning", "Structured: keep last blocks"),
    "prune.taylor_samples": ("Pruning", "Taylor importance: samples"),
    "prune.taylor_seqlen": ("Pruning", "Taylor importance: tokens each"),
    "calib.source": ("Calibration", "Source"),
    "calib.nsamples": ("Calibration", "Samples"),
    "calib.seqlen": ("Calibration", "Tokens per sample"),
    "calib.self_nsamples": ("Calibration", "Add self-generated samples"),
    "ebft.epochs": ("EBFT", "Epochs per block"),
    "ebft.lr": ("EBFT", "Learning rate"),
    "ebft.batch_size": ("EBFT", "Batch size"),
    "lora.rank": ("LoRA (when chosen under Recoveries)", "Rank"),
    "lora.lr": ("LoRA (when chosen under Recoveries)", "Learning rate"),
    "lora.budget": ("LoRA (when chosen under Recoveries)", "Budget"),
    "eval.source": ("Evaluation", "Source"),
    "eval.seqlen": ("Evaluation", "Window (tokens; 0 = model context)"),
    "eval.windows": ("Evaluation", "Windows (0 = all)"),
    "eval.zeroshot": ("Evaluation", "Zero-shot tasks (lm-eval)"),
    "eval.zeroshot_limit": ("Evaluation", "Examples per task (0 = all)"),
    "seed": ("Run", "Seed"),
    "save_model": ("Run", "Save the EBFT model to folder (optional)"),
}


@pytest.fixture(autouse=True)
def _workstation(monkeypatch, tmp_path):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("EBFT_RUNS_DIR", str(tmp_path / "runs"))


def _controls(config: RunConfig = RICH) -> Controls:
    with gr.Blocks():
        return Controls(create_setup_panels(config, spaces=False))


def _expected(config: RunConfig = RICH) -> RunConfig:
    return config.with_overrides({"runs_dir": policy.runs_dir()})


def _through_components(controls: Controls, config: RunConfig) -> dict:
    """``{component: value}`` as a handler receives it: each value sent to the browser and read back."""
    return {c: c.preprocess(c.postprocess(value)) for c, value in controls.updates(config).items()}


def _accordion(component) -> str | None:
    block = component.parent
    while block is not None and not isinstance(block, gr.Accordion):
        block = block.parent
    return None if block is None else block.label


def test_every_control_key_is_a_field_the_config_accepts():
    controls = _controls()
    defaults = RunConfig()
    for path in controls.components:
        value = field_value(defaults, path)  # KeyError: no such field
        assert not isinstance(value, dict), f"{path} is a section, not a field"
        assert defaults.with_overrides({path: value}) == defaults
    with pytest.raises(ConfigError, match="not a known field"):
        values_to_config({"prune.sparsityy": 0.5})


def test_the_fixture_differs_from_the_defaults_in_every_control_and_between_controls():
    values = config_to_values(RICH, _controls().components)
    shown_default = config_to_values(RunConfig(), values)
    assert [p for p in values if values[p] == shown_default[p]] == []
    assert [(a, b) for a, b in itertools.combinations(values, 2) if values[a] == values[b]] == []


def test_controls_cover_the_same_fields_with_the_same_labels_as_before():
    controls = _controls()
    assert list(controls.components) == list(LABELS)  # the page's order, which is also the HTTP API's
    assert controls.api_order == list(LABELS)
    for path, component in controls.components.items():
        assert (_accordion(component), component.label) == LABELS[path], path


def test_each_control_starts_at_the_value_of_its_own_field():
    controls = _controls(RICH)
    shown = config_to_values(RICH, controls.components)
    for path, component in controls.components.items():
        assert component.value == shown[path], path


def test_config_to_controls_and_back_is_the_same_config():
    controls = _controls()
    assert values_to_config(config_to_values(RICH, controls.components)) == _expected()
    assert controls.config(controls.updates(RICH)) == _expected()
    assert controls.config(_through_components(controls, RICH)) == _expected()
    for name in ("tiny-random", "smollm2-demo", "smollm2-structured"):  # the presets' fields the page shows
        preset = load_preset(name)
        again = controls.config(_through_components(controls, preset))
        assert config_to_values(again, controls.components) == config_to_values(preset, controls.components)


def test_swapping_any_two_controls_values_changes_the_config():
    """What a handler wired to the wrong controls would do: every such swap gives another config, or is refused."""
    controls = _controls()
    values = controls.updates(RICH)
    unnoticed = []
    for a, b in itertools.combinations(values, 2):
        swapped = {**values, a: values[b], b: values[a]}
        try:
            config = controls.config(swapped)
        except (EbftError, TypeError, ValueError):
            continue
        if config == _expected():
            unnoticed.append((controls.fields({a: 0}), controls.fields({b: 0})))
    assert unnoticed == []


def test_handlers_take_the_components_values_by_component_not_by_position():
    from ebft_engine import RunConfig as Config
    from lab.runner import SetupHandlers

    controls = _controls()
    values = controls.updates(RICH)
    shuffled = dict(reversed(list(values.items())))  # Gradio's order is not the handler's concern
    extra = gr.Textbox("not a control", render=False)
    path, note = SetupHandlers(controls, extra).export_yaml({**shuffled, extra: "ignored"})
    assert Config.from_yaml(path).with_overrides({"runs_dir": policy.runs_dir()}) == _expected()
    assert "--config" in note
    failed, message = SetupHandlers(controls, extra).export_yaml({**values, controls.components["ebft.lr"]: -1})
    assert failed is None and message.startswith("⚠️ ebft.lr")


def test_a_preset_fills_every_control_and_the_same_preset_again_nothing():
    controls = _controls(load_preset("smollm2-demo"))
    with gr.Blocks():
        loaded = gr.State("smollm2-demo")
    fill = preset_filler(controls, loaded)
    assert fill.__name__ == "fill_from_preset"  # the event's API name
    assert fill("smollm2-demo", "smollm2-demo") == {loaded: "smollm2-demo"}
    updates = fill("tiny-random", "smollm2-demo")
    assert updates.pop(loaded) == "tiny-random"
    assert updates == controls.updates(load_preset("tiny-random"))
    assert set(updates) == controls.inputs


def test_the_methods_offered_are_the_engines():
    choices = method_choices()
    assert choices and all(method_ok(m) for m in choices) and len(set(choices)) == len(choices)
    controls = _controls()
    for path in ("prune.method", "baselines"):
        assert [value for _label, value in controls.components[path].choices] == choices


def test_the_http_api_takes_the_controls_in_api_order():
    """gradio_client callers pass the controls' values positionally: in Controls.api_order (the page's order)."""
    from lab.app import build_app

    demo = build_app()
    config = demo.get_config_file()
    labels = {c["id"]: c.get("props", {}).get("label") for c in config["components"]}
    endpoints = {d["api_name"]: [labels[i] for i in d["inputs"]] for d in config["dependencies"]}
    in_order = [LABELS[path][1] for path in _controls().api_order]
    for name in ("run", "step", "export_yaml"):
        assert endpoints[name] == in_order, name
    assert endpoints["plan"] == in_order + ["for"]


def test_control_values_shows_none_as_the_controls_empty_value():
    v = ControlValues(RunConfig())
    assert (v["eval.windows"], v["eval.seqlen"], v["eval.zeroshot_limit"]) == (0, 0, 0)
    assert (v["save_model"], v["eval.zeroshot"], v["recoveries"]) == ("", "", ["ebft"])
    assert values_to_config({"eval.windows": 0.0, "save_model": "  ", "recoveries": []}) == _expected(RunConfig())
