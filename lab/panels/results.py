"""The live run's column: status, loss curves, per-block losses, perplexities, sparsity, notices, the record."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from .. import plots, tables
from ..state import RunView

HOW_TO_READ = {
    "loss": "Each line is one block's reconstruction loss (mean squared error against the dense block) as EBFT "
            "trains it; the diamond at step 0 is the loss right after pruning. The bright line is the block "
            "training now. Lower is closer to the dense model; the y axis is logarithmic.",
    "bars": "For every block, grey is the loss after pruning and orange after EBFT: the gap is what training "
            "repaired. Late blocks carry larger activations, so their losses are larger.",
    "ppl": "Perplexity on held-out text, the same windows for every model. The dense model is the floor; "
           "compare each pruned model with it and EBFT with the method it started from.",
    "heat": "The fraction of each projection's weights pruned in each block (zeroed, or removed with their head or "
            "channel by structured pruning), as measured after the run. Uniform colour means every layer got the "
            "target sparsity exactly.",
}
# The run handlers' outputs, in this order (also the order of the HTTP API's outputs).
RESULT_KEYS = ("status", "loss_plot", "bars_plot", "ppl_table", "protocol", "ppl_plot", "heat_plot", "notices",
               "record")


def create_results_panel() -> dict[str, Component]:
    c: dict[str, Component] = {"status": gr.Markdown("**idle**", elem_id="status"),
                               "loss_plot": gr.Plot(label="loss", elem_id="loss-plot")}
    gr.Markdown(HOW_TO_READ["loss"])
    c["bars_plot"] = gr.Plot(label="per block", elem_id="bars-plot")
    gr.Markdown(HOW_TO_READ["bars"])
    c["ppl_table"] = gr.Dataframe(headers=tables.PPL_COLUMNS, label="Perplexity", interactive=False,
                                  elem_id="ppl-table")
    c["protocol"] = gr.Markdown()
    c["ppl_plot"] = gr.Plot(label="perplexity", elem_id="ppl-plot")
    gr.Markdown(HOW_TO_READ["ppl"])
    c["heat_plot"] = gr.Plot(label="sparsity", elem_id="heat-plot")
    gr.Markdown(HOW_TO_READ["heat"])
    c["notices"] = gr.Markdown()
    c["record"] = gr.File(label="run record (zip)", interactive=False)
    return c


def results_for(view: RunView, record: str | None = None, status: str | None = None) -> tuple:
    """The values of the RESULT_KEYS components for ``view``; ``status`` replaces the status line."""
    if status is None:
        status = f"**{view.status}** — {view.progress}" if view.status == "running" else f"**{view.status}**"
        if view.errors:
            status += "\n\n" + "\n\n".join(f"⚠️ {e}" for e in view.errors)
    proto = tables.protocol(view)
    values = {"status": status, "loss_plot": plots.loss_curves(view), "bars_plot": plots.loss_bars(view),
              "ppl_table": tables.ppl_table(view), "protocol": f"Protocol: {proto}" if proto else "",
              "ppl_plot": plots.ppl_bars(view), "heat_plot": plots.sparsity_heatmap(view),
              "notices": "\n".join(f"- *{level}*: {text}" for level, text in view.notices[-12:]), "record": record}
    return tuple(values[key] for key in RESULT_KEYS)
