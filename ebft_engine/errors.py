"""Errors the engine raises on purpose: each names what is wrong and how to fix it."""
from __future__ import annotations


class EbftError(Exception):
    """Base class: a message meant for a person, never a traceback from deep inside torch."""


class ConfigError(EbftError, ValueError):
    """A configuration field has a value the engine cannot use.

    Args:
        field: dotted name of the field, e.g. ``prune.sparsity``.
        problem: what is wrong with the value.
        fix: what to do instead.
    """

    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}; {fix}")

    def __reduce__(self):
        """Pickle by the three parts (Exception's default pickles the one sentence, which __init__ cannot take
        back): so the error survives a process boundary (multiprocessing, a ZeroGPU worker) whole."""
        return type(self), (self.field, self.problem, self.fix)


class ModelLoadError(EbftError):
    """The model could not be loaded, or its architecture is not supported."""


class DataError(EbftError):
    """A calibration or evaluation source could not be read."""


class Cancelled(EbftError):
    """Raised inside the engine when the caller asked to stop; the pipeline turns it into events."""
