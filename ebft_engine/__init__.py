"""EBFT Lab's engine: prune a causal LM and recover it with block-wise reconstruction fine-tuning (EBFT).

Python API::

    from ebft_engine import RunConfig, RunSummary, run
    config = RunConfig.from_yaml("assets/presets/smollm2-demo.yaml")
    for event in run(config):
        print(event)
    summary = event.summary  # the last event is RunFinished: summary.json's dict
    typed = RunSummary.from_dict(summary)  # the same, typed: typed.ppl, typed.eval.protocol(), ...
    # a run killed or stopped part way continues in its own folder, from its last finished block:
    for event in resume("runs/20261128-101500-417c2e"):
        ...

No UI code lives here: the CLI, the lab and the run folder all consume the same event stream.
"""
from .config import CalibConfig, EbftConfig, EvalConfig, PruneConfig, RunConfig
from .errors import Cancelled, ConfigError, DataError, EbftError, ModelLoadError
from .events import (BlockFinished, BlockStarted, EvalFinished, Event, Notice, PhaseFinished, PhaseStarted,
                     RunFinished, RunStarted, StepLoss, ZeroShotFinished, event_from_dict, event_to_dict)
from .evaluate import PerplexityResult, perplexity
from .models import LlamaAdapter, load_model, resolve_source
from .pipeline import resume, run
from .record import read_events
from .summary import RunSummary

__all__ = ["BlockFinished", "BlockStarted", "CalibConfig", "Cancelled", "ConfigError", "DataError", "EbftConfig",
           "EbftError", "EvalConfig", "EvalFinished", "Event", "LlamaAdapter", "ModelLoadError", "Notice",
           "PerplexityResult", "PhaseFinished", "PhaseStarted", "PruneConfig", "RunConfig", "RunFinished",
           "RunStarted", "RunSummary", "StepLoss", "event_from_dict", "event_to_dict", "load_model", "perplexity",
           "ZeroShotFinished", "read_events", "resolve_source", "resume", "run"]
