"""The lab's panels, one module each. A ``create_*_panel`` builder lays its components out inside the current
Gradio context and returns them as a dict: config controls keyed by the config field path they set
("prune.sparsity", "calib.nsamples"; see lab/controls.py), the other components by a plain name."""
from __future__ import annotations

from gradio.components import Component

from ebft_engine import RunConfig

from ..controls import ControlValues
from .calib import create_calib_panel
from .ebft import create_ebft_panel
from .evaluation import create_eval_panel
from .lora import create_lora_panel
from .model import create_model_panel
from .prune import create_prune_panel
from .run_options import create_run_options_panel


def create_setup_panels(config: RunConfig, spaces: bool) -> dict[str, Component]:
    """Every config control of the setup column, showing ``config``, in the page's order."""
    v = ControlValues(config)
    controls: dict[str, Component] = {}
    for panel in (create_model_panel(v, spaces), create_prune_panel(v), create_calib_panel(v, spaces),
                  create_ebft_panel(v), create_lora_panel(v), create_eval_panel(v, spaces),
                  create_run_options_panel(v, spaces)):
        twice = controls.keys() & panel.keys()
        if twice:
            raise ValueError(f"two panels set {sorted(twice)}")
        controls.update(panel)
    return controls
