"""The Preset dropdown: fills every config control from assets/presets/<name>.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr
from gradio.components import Component

from ebft_engine import RunConfig

from .. import policy
from ..controls import Controls

PRESETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "presets"
DEFAULT_PRESET = "smollm2-spaces" if policy.on_spaces() else "smollm2-demo"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> RunConfig:
    return RunConfig.from_yaml(PRESETS_DIR / f"{name}.yaml")


def create_preset_panel(default: str) -> dict[str, Component]:
    """The dropdown, and the preset the controls were last filled from (see fill_from_preset)."""
    return {"preset": gr.Dropdown(preset_names(), value=default, label="Preset"), "loaded": gr.State(default)}


def preset_filler(controls: Controls, loaded_state: gr.State) -> Callable[[str, str], dict[Component, Any]]:
    """The handler behind the dropdown (inputs: the dropdown and ``loaded_state``; outputs: every control and
    ``loaded_state``)."""

    def fill_from_preset(name: str, loaded: str) -> dict[Component, Any]:
        """Every control set from the preset ``name``. A dropdown can report the same choice again (on blur): the
        controls are refilled only when the preset changed, so edits made after choosing one are never undone."""
        if name == loaded or name not in preset_names():
            return {loaded_state: loaded}
        return {**controls.updates(load_preset(name)), loaded_state: name}

    return fill_from_preset
