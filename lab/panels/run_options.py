"""The Run accordion: the seed, and where to save the recovered model (not on Spaces)."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from ..controls import ControlValues


def create_run_options_panel(v: ControlValues, spaces: bool) -> dict[str, Component]:
    with gr.Accordion("Run", open=False):
        return {
            "seed": gr.Number(v["seed"], precision=0, label="Seed"),
            "save_model": gr.Textbox(v["save_model"], label="Save the EBFT model to folder (optional)",
                                     visible=not spaces),
        }
