"""The History tab: past runs, compared side by side, and Resume for a stopped one."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.components import Component

from .. import plots, policy, tables

# refresh_history's outputs, in this order
HISTORY_KEYS = ("runs", "chosen", "to_resume")


def create_history_panel() -> dict[str, Component]:
    c: dict[str, Component] = {"refresh": gr.Button("Refresh"), "runs": gr.Dataframe(label="Runs", interactive=False),
                               "chosen": gr.CheckboxGroup([], label="Compare runs"), "compare": gr.Button("Compare"),
                               "compare_plot": gr.Plot(label="compared"),
                               "compare_table": gr.Dataframe(label="Perplexities compared", interactive=False)}
    gr.Markdown("**Resume** a run that was interrupted (a crash, a closed machine), stopped or failed: it goes on "
                "from its last finished block, in the Lab tab, and ends as if it had never stopped.")
    with gr.Row():
        c["to_resume"] = gr.Dropdown([], label="Stopped runs", elem_id="resume-choice", scale=3)
        c["resume"] = gr.Button("Resume", elem_id="resume-btn", scale=1)
    return c


def refresh_history():
    table = tables.list_runs(policy.runs_dir())
    stopped = list(table.loc[table["status"].isin(tables.RESUMABLE), "run"])
    return (table, gr.update(choices=list(table["run"]), value=[]),
            gr.update(choices=stopped, value=stopped[0] if stopped else None))


def compare_runs(selected: list[str]):
    if not selected:
        return plots.compare_curves({}), tables.compare_table({})
    views = {name: tables.load_view(Path(policy.runs_dir()) / name) for name in selected}
    return plots.compare_curves(views), tables.compare_table(views)
