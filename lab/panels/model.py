"""The model to prune: a preset name, a hub id, or (off Spaces) a local folder or .gguf file."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from .. import policy
from ..controls import ControlValues


def create_model_panel(v: ControlValues, spaces: bool) -> dict[str, Component]:
    return {"model": gr.Dropdown(list(policy.PRESET_MODELS), value=v["model"], allow_custom_value=True,
                                 label="Model", info="a preset, or a hub id" +
                                 ("" if spaces else ", local folder or .gguf file"))}
