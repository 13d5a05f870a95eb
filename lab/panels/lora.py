"""The LoRA accordion: the adapters' recovery, when LoRA is ticked under Recoveries."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from ..controls import ControlValues


def create_lora_panel(v: ControlValues) -> dict[str, Component]:
    with gr.Accordion("LoRA (when chosen under Recoveries)", open=False):
        return {
            "lora.rank": gr.Number(v["lora.rank"], precision=0, label="Rank"),
            "lora.lr": gr.Number(v["lora.lr"], label="Learning rate"),
            "lora.budget": gr.Dropdown(["ebft", "epochs"], value=v["lora.budget"], label="Budget",
                                       info="ebft: the same wall-clock time as EBFT in this run"),
        }
