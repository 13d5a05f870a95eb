"""The checks behind the run configuration (config.py), each a small function that raises ConfigError naming the
field, the problem and the fix; torch-free, like the registry it reads.

Field checks (``check_int``, ``check_float``, ``coerce``, ``parse_pattern``) take a value and its dotted name;
the section checks take the values of one section (``check_prune``, ``eval_tasks``) or of several
(``check_baselines``, ``check_sections``) and run their checks in the order the configuration documents, so a
value that could trip two checks always reports the same one.
"""
from __future__ import annotations

import math
from typing import Any

from . import registry
from .errors import ConfigError

STRUCTURED = "structured"  # the pattern of structured methods: whole heads and MLP channels removed


def method_ok(name: object) -> bool:
    """A pruning method name the registry knows: a method, or <allocation>-<mask method> (owl-wanda)."""
    return isinstance(name, str) and registry.split_method(name)[1] is not None


def methods_hint() -> str:
    masks = [e.name for e in registry.pruning_entries("mask")]
    structured = [e.name for e in registry.pruning_entries("structured")]
    allocations = [e.name for e in registry.pruning_entries("allocation")]
    return ", ".join(masks + structured) + "".join(f", or {a}-<method> ({a}'s per-block sparsity)"
                                                    for a in allocations)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return (N, M) for an "N:M" pattern, None for "unstructured" or "structured"; raise ConfigError otherwise."""
    if pattern in ("unstructured", STRUCTURED):
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError("prune.pattern", f"{pattern!r} is neither 'unstructured', 'structured' nor N:M",
                          "use 'unstructured', '2:4', '4:8' or 'structured' (with --method llm-pruner)")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ConfigError("prune.pattern", f"{pattern!r} is not N:M with 0 < N < M (N weights kept of every M)",
                          "try '2:4' or '4:8'")
    return n, m


def source_ok(source: str, allowed: tuple[str, ...]) -> bool:
    return source in allowed or (source.startswith("file:") and len(source) > len("file:"))


def check_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"{value!r} is not a whole number", fix)
    if value < minimum:
        raise ConfigError(name, f"{value} is below {minimum}", fix)


def check_optional_int(name: str, value: Any, minimum: int, fix: str) -> None:
    """``check_int`` for a field whose None means "not set"."""
    if value is not None:
        check_int(name, value, minimum, fix)


def check_float(name: str, value: Any, minimum: float, fix: str, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"{value!r} is not a finite number", fix)
    if value < minimum or (strict and value <= minimum):
        raise ConfigError(name, f"{value:g} is {'not above' if strict else 'below'} {minimum:g}", fix)


def coerce(name: str, value: Any, annotation: str) -> Any:
    """YAML and the CLI give strings for numbers now and then ("2e-4"); accept those, reject the rest."""
    if value is None or not isinstance(value, str):
        if "float" in annotation and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if "int" in annotation and "float" not in annotation:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not a whole number", "write digits only, e.g. 128") from None
    if "float" in annotation:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not a number", "write a number, e.g. 0.5 or 2e-4") from None
    return value


def split_names(value: Any) -> Any:
    """A comma-separated string as a tuple of its non-blank items; any other value as it is."""
    return tuple(v for v in value.split(",") if v.strip()) if isinstance(value, str) else value


# ---- prune -------------------------------------------------------------------------------------------------
def check_method(method: Any) -> None:
    if not method_ok(method):
        raise ConfigError("prune.method", f"unknown method {method!r}", f"choose one of {methods_hint()}")


def check_pattern_fits_method(method: str, pattern: str, structured: bool) -> None:
    """A structured method makes the structured pattern, and only a structured method makes it."""
    if pattern == STRUCTURED and not structured:
        raise ConfigError("prune.pattern", f"structured pruning removes whole heads and channels, and "
                          f"{method} chooses single weights", "use --method llm-pruner for structured "
                          "pruning, or --pattern unstructured / N:M with " + method)
    if structured and pattern != STRUCTURED:
        raise ConfigError("prune.pattern", f"{method} removes whole heads and channels and cannot make "
                          f"the {pattern} pattern", "leave --pattern out (or set it to structured)")


def check_sparsity(s: Any) -> float:
    if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 <= s < 1):
        raise ConfigError("prune.sparsity", f"{s!r} is outside [0, 1)",
                          "give the fraction of weights to remove, e.g. 0.5 for 50%")
    return float(s)


def check_nm_sparsity(method: str, pattern: str, nm: tuple[int, int] | None, sparsity: float) -> None:
    """An N:M pattern fixes the sparsity at 1 - N/M and leaves no room for a per-block allocation (owl-)."""
    if nm is None:
        return
    if registry.split_method(method)[0] is not None:
        raise ConfigError("prune.method", f"{method} allocates unstructured sparsity per block, and the "
                          f"pattern is {pattern}", "use --pattern unstructured with it, or choose the "
                          "method alone")
    if abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise ConfigError("prune.sparsity",
                          f"{sparsity:g} disagrees with pattern {pattern} (which removes "
                          f"{1 - nm[0] / nm[1]:g})",
                          f"leave sparsity out or set it to {1 - nm[0] / nm[1]:g}")


# ---- eval --------------------------------------------------------------------------------------------------
def eval_tasks(zeroshot: Any) -> tuple[str, ...]:
    """The lm-eval task names of ``eval.zeroshot`` (a list or a comma-separated string), stripped, in order,
    each once."""
    tasks = split_names(zeroshot)
    if not isinstance(tasks, (tuple, list)) or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ConfigError("eval.zeroshot", f"{zeroshot!r} is not a list of lm-eval task names",
                          "write e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    return tuple(dict.fromkeys(t.strip() for t in tasks))


def check_include(include: Any) -> None:
    if include is not None and (not isinstance(include, str) or not include.strip()):
        raise ConfigError("eval.zeroshot_include", f"{include!r} is not a folder",
                          "give the folder holding your task YAML files")


# ---- the run -----------------------------------------------------------------------------------------------
def check_model(model: Any) -> None:
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("model", "no model given", "give a hub id, a local folder, a .gguf file or "
                          "'smollm2-135m'")


def baseline_names(value: Any) -> tuple[str, ...]:
    """The baselines as given (a list or a comma-separated string), stripped and each a known method; repeats
    kept (``check_baselines`` reads them in the order given)."""
    value = split_names(value)
    if not isinstance(value, (tuple, list)):
        raise ConfigError("baselines", f"{value!r} is not a list of methods",
                          "write e.g. magnitude,wanda,sparsegpt")
    baselines = tuple(str(b).strip() for b in value)
    for b in baselines:
        if not method_ok(b):
            raise ConfigError("baselines", f"unknown method {b!r}", f"choose from {methods_hint()}")
    return baselines


def check_baselines(baselines: tuple[str, ...], prune: Any) -> None:
    """Every baseline prunes in the pattern of ``prune`` (a PruneConfig): structured and weight-by-weight
    pruning are measured apart, and an N:M pattern has no per-block allocation."""
    for b in baselines:
        if registry.is_structured(b) != prune.structured:
            raise ConfigError("baselines", f"{b} and --method {prune.method} prune in different patterns "
                              f"({'structured' if registry.is_structured(b) else 'weight by weight'} vs "
                              f"{prune.pattern}), which are measured apart",
                              "run structured pruning (llm-pruner) and the other methods as separate runs: "
                              "here --baselines '' (none) or --baselines llm-pruner")
    if prune.nm is not None and any(registry.split_method(b)[0] is not None for b in baselines):
        raise ConfigError("baselines", f"a per-block allocation (owl-) makes unstructured sparsity and the "
                          f"pattern is {prune.pattern}", "drop the owl- baselines or use --pattern "
                          "unstructured")


def recovery_names(value: Any) -> tuple[str, ...]:
    """The recoveries (a list or a comma-separated string, at least one), stripped, in order, each once."""
    recoveries = split_names(value)
    names = [e.name for e in registry.recovery_entries()]
    if not isinstance(recoveries, (tuple, list)) or not recoveries or not all(
            isinstance(r, str) and r.strip() in names for r in recoveries):
        raise ConfigError("recoveries", f"{value!r} is not a list of recoveries",
                          f"choose one or more of {', '.join(names)}, e.g. ebft,ebft-gp")
    return tuple(dict.fromkeys(r.strip() for r in recoveries))


def check_choice(name: str, value: Any, allowed: tuple[str, ...], what: str, fix: str) -> None:
    if value not in allowed:
        raise ConfigError(name, f"unknown {what} {value!r}", fix)


def check_path(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(name, f"{value!r} is not a path", "give a folder or file path")


def check_sections(calib: Any, eval_: Any, ebft: Any, trains_blocks: bool = True) -> None:
    """What one section asks of another: calibration text apart from the evaluated text, and, when a recovery
    trains blocks (``trains_blocks``: ebft, ebft-gp), an EBFT batch no larger than the calibration set."""
    if calib.source.startswith("file:") and calib.source == eval_.source:
        raise ConfigError("calib.source", f"calibrating on {calib.source[5:]!r}, the same text that is "
                          "evaluated, would contaminate the perplexity", "calibrate on another file, c4 "
                          "or self")
    if trains_blocks and calib.nsamples < ebft.batch_size and ebft.epochs > 0:
        raise ConfigError("ebft.batch_size", f"{ebft.batch_size} is larger than calib.nsamples "
                          f"({calib.nsamples})", "use a batch size no larger than the number of "
                          "calibration samples")
