"""The Gradio lab: setup panel, live run, results, history and a Learn tab. Layout and wiring only: the panels
are built in lab/panels/, the handlers are in lab/runner.py, the config <-> controls mapping in lab/controls.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from . import policy, runner
from .controls import Controls
from .panels import create_setup_panels
from .panels.actions import create_actions_panel
from .panels.history import HISTORY_KEYS, compare_runs, create_history_panel, refresh_history
from .panels.learn import create_learn_panel
from .panels.preset import DEFAULT_PRESET, create_preset_panel, load_preset, preset_filler
from .panels.results import RESULT_KEYS, create_results_panel

ROOT = Path(__file__).resolve().parents[1]
GPU = "device"  # every event that touches the model shares this concurrency id: one job at a time


def build_app() -> gr.Blocks:
    with gr.Blocks(title="EBFT Lab") as demo:
        gr.Markdown("# EBFT Lab\nPrune a language model, then win its accuracy back with block-wise "
                    "reconstruction fine-tuning (EBFT). Pick a preset, press **Run**, and watch every block learn.")
        with gr.Tabs() as tabs:
            with gr.Tab("Lab", id="lab"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        preset = create_preset_panel(DEFAULT_PRESET)
                        controls = Controls(create_setup_panels(load_preset(DEFAULT_PRESET), policy.on_spaces()))
                        actions = create_actions_panel(policy.on_zero_gpu())
                    with gr.Column(scale=2):
                        results = create_results_panel()
            with gr.Tab("History") as history_tab:
                history = create_history_panel()
            with gr.Tab("Learn"):
                create_learn_panel()
        _wire(tabs, preset, controls, actions, results, history)
        # the History tab is current whenever it is opened, and after every run (below)
        history_tab.select(refresh_history, None, [history[k] for k in HISTORY_KEYS], queue=False)
        demo.load(refresh_history, None, [history[k] for k in HISTORY_KEYS])
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def _wire(tabs: gr.Tabs, preset: dict, controls: Controls, actions: dict, results: dict, history: dict) -> None:
    """The events between the panels. Handlers that read the setup get ``controls.inputs`` (a set: Gradio hands
    them ``{component: value}``), and SetupHandlers maps it back to config fields with the page's Controls."""
    outputs = [results[k] for k in RESULT_KEYS]
    setup = runner.SetupHandlers(controls, actions["plan_card"])
    preset["preset"].change(preset_filler(controls, preset["loaded"]), [preset["preset"], preset["loaded"]],
                            [*controls.components.values(), preset["loaded"]])
    run_evt = actions["run"].click(setup.start_run, controls.inputs, outputs, concurrency_id=GPU, concurrency_limit=1,
                                   api_name="run", show_progress="hidden")
    step_evt = actions["step"].click(setup.step_run, controls.inputs, outputs, concurrency_id=GPU,
                                     concurrency_limit=1, api_name="step", show_progress="hidden")
    # On ZeroGPU the run lives in a worker process the Stop flag cannot reach: there Stop also cancels the event
    # (a Step click in flight too: its run stops as cancelled in its folder).
    actions["stop"].click(runner.stop_run, None, results["notices"], queue=False, api_name="stop",
                          cancels=[run_evt, step_evt] if policy.on_zero_gpu() else None)
    actions["export"].click(setup.export_yaml, controls.inputs, [actions["yaml_file"], actions["yaml_note"]],
                            api_name="export_yaml")
    actions["plan"].click(setup.plan_run, controls.inputs | {actions["plan_card"]}, actions["plan_text"],
                          api_name="plan")
    history_outputs = [history[k] for k in HISTORY_KEYS]
    history["refresh"].click(refresh_history, None, history_outputs, api_name="history")
    for event in (run_evt, step_evt):  # a finished (or stopped) run shows in History without a Refresh
        event.then(refresh_history, None, history_outputs, queue=False)
    history["compare"].click(compare_runs, history["chosen"], [history["compare_plot"], history["compare_table"]],
                             api_name="compare")
    history["resume"].click(lambda: gr.Tabs(selected="lab"), None, tabs, queue=False).then(
        runner.resume_run, history["to_resume"], outputs, concurrency_id=GPU, concurrency_limit=1, api_name="resume",
        show_progress="hidden").then(refresh_history, None, history_outputs, queue=False)


def main(options: dict[str, Any]) -> None:
    """Serve the lab with :func:`lab.policy.server_options` (checked by app.py before Gradio is imported)."""
    build_app().launch(**options, css_paths=[str(ROOT / "assets" / "style.css")])
