"""The buttons under the setup: Run, Step, Stop; the memory plan for a card; the config as YAML."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from ebft_engine.cards import CARDS

THIS_MACHINE = "this machine"


STEP_NOTE = "**Step** runs one block per click (for a classroom); **Stop** ends either kind of run."
# ZeroGPU lends the GPU for one call at a time (lab/runner.py, SetupHandlers.step_run)
ZERO_GPU_STEP_NOTE = (" On this ZeroGPU Space each click is its own GPU call, which resumes the run from its last "
                      "finished block: it reloads the model first, so a click takes a few seconds more.")


def create_actions_panel(zero_gpu: bool = False) -> dict[str, Component]:
    c: dict[str, Component] = {}
    with gr.Row():
        c["run"] = gr.Button("Run", variant="primary", elem_id="run-btn")
        c["step"] = gr.Button("Step", elem_id="step-btn")
        c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop-btn")
    c["step_note"] = gr.Markdown(STEP_NOTE + (ZERO_GPU_STEP_NOTE if zero_gpu else ""), elem_id="step-note")
    with gr.Row():
        c["plan"] = gr.Button("Memory plan", elem_id="plan-btn")
        c["plan_card"] = gr.Dropdown([THIS_MACHINE, *CARDS], value=THIS_MACHINE, label="for", elem_id="plan-card",
                                     min_width=120)
    c["plan_text"] = gr.Markdown(elem_id="plan")
    c["export"] = gr.Button("Download config as YAML")
    c["yaml_file"] = gr.File(label="config", interactive=False)
    c["yaml_note"] = gr.Markdown()
    return c
