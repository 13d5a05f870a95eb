"""The Evaluation accordion: the perplexity protocol and the zero-shot tasks."""
from __future__ import annotations

import gradio as gr
from gradio.components import Component

from ..controls import ControlValues


def create_eval_panel(v: ControlValues, spaces: bool) -> dict[str, Component]:
    with gr.Accordion("Evaluation", open=False):
        return {
            "eval.source": gr.Dropdown(["wikitext2", "c4", "ptb"], value=v["eval.source"],
                                       allow_custom_value=not spaces, label="Source"),
            "eval.seqlen": gr.Number(v["eval.seqlen"], precision=0, label="Window (tokens; 0 = model context)"),
            "eval.windows": gr.Number(v["eval.windows"], precision=0, label="Windows (0 = all)"),
            "eval.zeroshot": gr.Textbox(v["eval.zeroshot"], label="Zero-shot tasks (lm-eval)",
                                        placeholder="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,"
                                                    "openbookqa"),
            "eval.zeroshot_limit": gr.Number(v["eval.zeroshot_limit"], precision=0,
                                             label="Examples per task (0 = all)"),
        }
