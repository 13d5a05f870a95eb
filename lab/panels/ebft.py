"""The EBFT accordion: block-wise reconstruction fine-tuning."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from ..controls import ControlValues


def create_ebft_panel(v: ControlValues) -> dict[str, Component]:
    with gr.Accordion("EBFT", open=False, elem_id="acc-ebft"):
        return {
            "ebft.epochs": gr.Number(v["ebft.epochs"], precision=0, label="Epochs per block"),
            "ebft.lr": gr.Number(v["ebft.lr"], label="Learning rate"),
            "ebft.batch_size": gr.Number(v["ebft.batch_size"], precision=0, label="Batch size"),
        }
