"""The Pruning accordion: method, pattern and sparsity, the baselines and recoveries to run, and each method's
own settings (DSnoT, OWL, structured pruning)."""
from __future__ import annotations

from typing import Any

import gradio as gr
from gradio.components import Component

from ebft_engine import ConfigError
from ebft_engine.config import (DSNOT_INITS, DSNOT_LAYERS, OWL_PREFIX, PRUNE_METHODS, RECOVERIES, STRUCTURED_METHODS,
                                parse_pattern)

from ..controls import ControlValues


def method_choices() -> list[str]:
    """Every method the Method dropdown and the Baselines boxes offer: the one place that lists them, so that it can
    read the engine's pruner registry instead with a one-line change."""
    return list(PRUNE_METHODS) + [OWL_PREFIX + m for m in ("wanda", "sparsegpt", "magnitude", "dsnot")]


def pattern_for_method(method: str, pattern: str) -> Any:
    """llm-pruner prunes structurally: show the pattern it implies, and leave structured when another method is
    chosen (every other method prunes weight by weight)."""
    if method in STRUCTURED_METHODS:
        return "structured"
    return "unstructured" if pattern == "structured" else gr.skip()


def sparsity_for_pattern(pattern: str) -> Any:
    """An N:M pattern fixes the sparsity (1 - N/M): the slider shows it, so the run does what the page says."""
    try:
        nm = parse_pattern(pattern)
    except ConfigError:
        return gr.skip()
    return gr.skip() if nm is None else round(1 - nm[0] / nm[1], 4)


def create_prune_panel(v: ControlValues) -> dict[str, Component]:
    methods = method_choices()
    with gr.Accordion("Pruning", open=True):
        c: dict[str, Component] = {
            "prune.method": gr.Dropdown(methods, value=v["prune.method"], label="Method (EBFT starts from it)",
                                        info="owl-: OWL's outlier-weighted sparsity per block"),
            "prune.pattern": gr.Dropdown(["unstructured", "2:4", "4:8", "structured"], value=v["prune.pattern"],
                                         label="Pattern",
                                         info="structured: whole heads and MLP channels (method llm-pruner)"),
            "prune.sparsity": gr.Slider(0.0, 0.95, value=v["prune.sparsity"], step=0.05, label="Sparsity",
                                        info="unstructured: per layer; structured: of all blocks' weights; "
                                             "N:M fixes it"),
            "baselines": gr.CheckboxGroup(methods, value=v["baselines"], label="Baselines to compare"),
            "recoveries": gr.CheckboxGroup(list(RECOVERIES), value=v["recoveries"], label="Recoveries",
                                           info="ebft: target the dense block on the sparse inputs (the paper); "
                                                "ebft-gp: the dense model's own stream"),
        }
        with gr.Row():
            c["prune.dsnot_init"] = gr.Dropdown(list(DSNOT_INITS), value=v["prune.dsnot_init"], label="DSnoT refines")
            c["prune.dsnot_layers"] = gr.Dropdown(list(DSNOT_LAYERS), value=v["prune.dsnot_layers"],
                                                  label="DSnoT layers",
                                                  info="attention: q, k, v, o only (the reference default)")
        with gr.Row():
            c["prune.owl_lambda"] = gr.Number(v["prune.owl_lambda"], label="OWL λ (sparsity spread)")
            c["prune.owl_m"] = gr.Number(v["prune.owl_m"], label="OWL M (outlier threshold)")
        with gr.Row():
            c["prune.keep_first"] = gr.Number(v["prune.keep_first"], precision=0, label="Structured: keep first blocks")
            c["prune.keep_last"] = gr.Number(v["prune.keep_last"], precision=0, label="Structured: keep last blocks")
        with gr.Row():
            c["prune.taylor_samples"] = gr.Number(v["prune.taylor_samples"], precision=0,
                                                  label="Taylor importance: samples")
            c["prune.taylor_seqlen"] = gr.Number(v["prune.taylor_seqlen"], precision=0,
                                                 label="Taylor importance: tokens each")
    method, pattern = c["prune.method"], c["prune.pattern"]
    method.change(pattern_for_method, [method, pattern], pattern, queue=False)
    pattern.change(sparsity_for_pattern, pattern, c["prune.sparsity"], queue=False)
    return c
