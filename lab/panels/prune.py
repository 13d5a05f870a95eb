"""The Pruning accordion: method, pattern and sparsity, the baselines and recoveries to run, and each method's
own settings (DSnoT, OWL, structured pruning)."""
from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr
from gradio.components import Component

from ebft_engine import ConfigError
from ebft_engine import registry
from ebft_engine.config import parse_pattern

from ..controls import ControlValues


def method_choices() -> list[str]:
    """Every method the Method dropdown and the Baselines boxes offer: the engine's pruning registry."""
    return registry.method_names()


def pattern_for_method(method: str, pattern: str) -> Any:
    """llm-pruner prunes structurally: show the pattern it implies, and leave structured when another method is
    chosen (every other method prunes weight by weight)."""
    if registry.is_structured(method):
        return "structured"
    return "unstructured" if pattern == "structured" else gr.skip()


def sparsity_for_pattern(pattern: str) -> Any:
    """An N:M pattern fixes the sparsity (1 - N/M): the slider shows it, so the run does what the page says."""
    try:
        nm = parse_pattern(pattern)
    except ConfigError:
        return gr.skip()
    return gr.skip() if nm is None else round(1 - nm[0] / nm[1], 4)


def option_control(f: dataclasses.Field, value: Any) -> Component:
    """The control of one registered method option (``registry.option``): a dropdown of its choices, else a
    number (whole for an int option), labelled as the option says."""
    meta = f.metadata
    label = meta.get("label") or f.name.replace("_", " ")
    if meta.get("choices"):
        return gr.Dropdown(list(meta["choices"]), value=value, label=label, info=meta["help"])
    whole = "int" in str(f.type) and "float" not in str(f.type)
    return gr.Number(value, precision=0 if whole else None, label=label, info=meta["help"])


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
            "recoveries": gr.CheckboxGroup([e.name for e in registry.recovery_entries()], value=v["recoveries"],
                                           label="Recoveries",
                                           info="ebft: target the dense block on the sparse inputs (the paper); "
                                                "ebft-gp: the dense model's own stream; ebft-mask(-gp): also learn "
                                                "which weights to keep"),
        }
        for entry in registry.pruning_entries():  # each method's own settings, one row per method
            fields = dataclasses.fields(entry.options) if entry.options else ()
            if fields:
                with gr.Row():
                    for f in fields:
                        c[f"prune.{f.name}"] = option_control(f, v[f"prune.{f.name}"])
    method, pattern = c["prune.method"], c["prune.pattern"]
    method.change(pattern_for_method, [method, pattern], pattern, queue=False)
    pattern.change(sparsity_for_pattern, pattern, c["prune.sparsity"], queue=False)
    return c
