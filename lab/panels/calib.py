"""The Calibration accordion: the text the pruning statistics and the reconstruction are computed on."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from ..controls import ControlValues


def create_calib_panel(v: ControlValues, spaces: bool) -> dict[str, Component]:
    with gr.Accordion("Calibration", open=False):
        return {
            "calib.source": gr.Dropdown(["self", "c4", "wikitext2"], value=v["calib.source"],
                                        allow_custom_value=not spaces, label="Source",
                                        info="self: text the model writes itself" + ("" if spaces else
                                                                                     "; or file:PATH")),
            "calib.nsamples": gr.Number(v["calib.nsamples"], precision=0, label="Samples"),
            "calib.seqlen": gr.Number(v["calib.seqlen"], precision=0, label="Tokens per sample"),
            "calib.self_nsamples": gr.Number(v["calib.self_nsamples"], precision=0,
                                             label="Add self-generated samples",
                                             info="for the reconstruction only (Shin et al.); not with source self"),
        }
