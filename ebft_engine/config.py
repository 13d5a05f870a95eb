"""Run configuration: frozen dataclasses, validated once, with errors that name the field and the fix.

One vocabulary throughout: ``sparsity`` is the fraction of weights removed. An N:M pattern keeps N weights
in every group of M consecutive input columns of a row, so "2:4" is 50% sparsity.

A configuration is read from a nested dict (a YAML preset) by :meth:`RunConfig.from_dict`, which rejects
unknown keys; CLI flags override single fields with :meth:`RunConfig.with_overrides`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .errors import ConfigError
from .validation import (STRUCTURED, baseline_names, check_baselines, check_choice, check_float, check_include,
                         check_int, check_method, check_model, check_nm_sparsity, check_optional_int, check_path,
                         check_pattern_fits_method, check_sections, check_sparsity, coerce, eval_tasks, parse_pattern,
                         recovery_names, source_ok)
from .validation import method_ok  # noqa: F401  (imported from here by the lab and the tests)

CALIB_SOURCES = ("c4", "wikitext2", "self")
EVAL_SOURCES = ("wikitext2", "c4", "ptb")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ACTIVATIONS = ("auto", "device", "host")
# How the pruned model is recovered from --method's masks: EBFT with the dense block on the sparse inputs as its
# target (the paper), or ebft-gp, with the dense model's own stream (global propagation,
# docs/methods/ebft.md#global-propagation-ebft-gp).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # where calibration activations live on a GPU run


@dataclass(frozen=True, init=False)
class PruneConfig:
    """How the initial masks are chosen.

    Args:
        method: a pruning method from the registry (``registry.method_names()``: magnitude, wanda, sparsegpt,
            sparsegpt-mask, dsnot, llm-pruner for structured pruning, owl-<method> for OWL's per-block sparsity).
        sparsity: fraction of weights removed in every pruned linear layer, in [0, 1). For an N:M pattern
            it may be left out and is then 1 - N/M. For structured pruning it is the fraction of all the
            blocks' projection weights removed (default 0.2); the blocks a structured method leaves whole
            make the others take a larger share so that the total comes out at this fraction.
        pattern: "unstructured", "N:M" (N kept of every M consecutive input columns) or "structured"
            (implied by a structured method: attention heads and MLP channels removed, the matrices smaller).
        **options: the registered methods' own settings, each a field of its options dataclass (e.g. dsnot_init,
            owl_lambda, keep_first: ``registry.option_fields()``); read as attributes (``cfg.keep_first``).
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    options: tuple[tuple[str, Any], ...] = ()  # every registered option: (name, value), in registry order

    def __init__(self, method: str = "wanda", sparsity: float | None = None, pattern: str = "unstructured",
                 options: Any = (), **named: Any):
        known = registry.option_defaults()
        given = {**dict(options), **named}
        for name in given:
            if name not in known:
                raise ConfigError(f"prune.{name}", "is not a known field",
                                  f"use one of {', '.join(['method', 'sparsity', 'pattern', *known])}")
        values = {name: registry.check_option(name, value) for name, value in {**known, **given}.items()}
        for key, value in (("method", method), ("sparsity", sparsity), ("pattern", pattern),
                           ("options", tuple(values.items()))):
            object.__setattr__(self, key, value)
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:  # a registered method's option, e.g. cfg.keep_first
        for key, value in self.__dict__.get("options", ()):
            if key == name:
                return value
        raise AttributeError(f"PruneConfig has no field or option {name!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        """The keys of the ``prune`` section: method, sparsity, pattern and every registered option."""
        return ["method", "sparsity", "pattern", *registry.option_defaults()]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sparsity": self.sparsity, "pattern": self.pattern, **dict(self.options)}

    @property
    def default_sparsity(self) -> float:
        """The sparsity when none is given: 0.2 structured (LLM-Pruner's), 1 - N/M for N:M, else 0.5."""
        nm = parse_pattern(self.pattern)
        return 0.2 if self.pattern == STRUCTURED else 0.5 if nm is None else 1 - nm[0] / nm[1]

    def __post_init__(self):
        check_method(self.method)
        structured = registry.is_structured(self.method)
        if structured and self.pattern == "unstructured":
            object.__setattr__(self, "pattern", STRUCTURED)  # llm-pruner is structured: no need to say it twice
        nm = parse_pattern(self.pattern)
        check_pattern_fits_method(self.method, self.pattern, structured)
        if self.sparsity is None:
            object.__setattr__(self, "sparsity", self.default_sparsity)
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        check_nm_sparsity(self.method, self.pattern, nm, self.sparsity)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def structured(self) -> bool:
        return self.pattern == STRUCTURED


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``nsamples`` windows of ``seqlen`` tokens from ``source``.

    Sources: c4 (train shard 0, random windows, seeded), wikitext2 (train split), file:PATH (random windows
    of a local text file), self (sequences generated by the dense model itself: no data set needed).

    ``self_nsamples`` appends that many sequences the dense model writes itself to the set (Shin et al.,
    docs/calibration.md#self-generated-calibration: it eases over-fitting the calibration text). They serve
    the reconstruction (EBFT, LoRA) only: the pruning statistics and importances come from the ``nsamples``
    of ``source`` alone.
    """

    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 1024
    self_nsamples: int = 0

    @property
    def total(self) -> int:
        """Sequences in the whole calibration set: the source's and the self-generated ones."""
        return self.nsamples + self.self_nsamples

    def __post_init__(self):
        if not isinstance(self.source, str) or not source_ok(self.source, CALIB_SOURCES):
            raise ConfigError("calib.source", f"unknown calibration source {self.source!r}",
                              f"use one of {', '.join(CALIB_SOURCES)} or file:PATH")
        check_int("calib.nsamples", self.nsamples, 1, "use at least 1 calibration sample")
        check_int("calib.seqlen", self.seqlen, 2, "use a sequence length of at least 2 tokens")
        check_int("calib.self_nsamples", self.self_nsamples, 0, "use 0 (none) or a number of generated sequences")
        if self.self_nsamples and self.source == "self":
            raise ConfigError("calib.self_nsamples", "the calibration set is already generated by the model",
                              "use self_nsamples with a text source (c4, wikitext2 or file:PATH), or set it to 0")


@dataclass(frozen=True)
class EbftConfig:
    """Block-wise reconstruction fine-tuning (docs/methods/ebft.md#block-wise-reconstruction). ``epochs: 0``
    skips EBFT."""

    epochs: int = 10
    lr: float = 2e-4
    batch_size: int = 8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_int("ebft.epochs", self.epochs, 0, "use 0 to skip EBFT or a positive number of epochs")
        check_int("ebft.batch_size", self.batch_size, 1, "use a batch size of at least 1")
        check_float("ebft.lr", self.lr, 0, "use a positive learning rate such as 2e-4", strict=True)
        check_float("ebft.weight_decay", self.weight_decay, 0, "use a non-negative weight decay such as 0.1")
        check_float("ebft.max_grad_norm", self.max_grad_norm, 0, "use a positive clipping norm such as 1.0",
                    strict=True)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA recovery with peft (docs/methods/lora.md#two-recipes): adapters on the projections, the sparse
    weights frozen, trained on the calibration tokens with the language-model loss.

    ``targets: auto`` is q_proj,v_proj (Wanda's recipe for unstructured and N:M sparsity), and all seven
    projections after structured pruning (LLM-Pruner's recipe). ``budget: ebft``
    trains for the wall-clock time EBFT took in the same run (a fair comparison; EBFT must run first), else
    ``epochs`` epochs.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = "auto"
    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 4
    budget: str = "ebft"

    def __post_init__(self):
        check_int("lora.rank", self.rank, 1, "use a rank of at least 1, e.g. 8")
        check_float("lora.alpha", self.alpha, 0, "use a positive scale such as 16", strict=True)
        check_float("lora.dropout", self.dropout, 0, "use a dropout in [0, 1), e.g. 0.05")
        if self.dropout >= 1:
            raise ConfigError("lora.dropout", f"{self.dropout:g} is not below 1", "use e.g. 0.05")
        check_float("lora.lr", self.lr, 0, "use a positive learning rate such as 1e-4", strict=True)
        check_int("lora.epochs", self.epochs, 1, "use at least 1 epoch")
        check_int("lora.batch_size", self.batch_size, 1, "use a batch size of at least 1")
        if self.budget not in ("ebft", "epochs"):
            raise ConfigError("lora.budget", f"{self.budget!r} is not ebft or epochs",
                              "use ebft (EBFT's wall-clock time in the same run) or epochs")
        if not isinstance(self.targets, str) or not (self.targets == "auto" or all(
                t.strip() in LORA_TARGETS for t in self.targets.split(","))):
            raise ConfigError("lora.targets", f"{self.targets!r} is not auto or a list of projections",
                              f"use auto or a comma-separated subset of {', '.join(LORA_TARGETS)}")

    def target_modules(self, structured: bool = False) -> list[str]:
        if self.targets == "auto":
            return list(LORA_TARGETS) if structured else ["q_proj", "v_proj"]
        return [t.strip() for t in self.targets.split(",")]


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity protocol: non-overlapping windows of ``seqlen`` tokens; ``windows`` limits to the first N.

    ``seqlen: null`` means the model's context length, capped at 2048 (the LLaMA-1 protocol).
    """

    source: str = "wikitext2"
    seqlen: int | None = None
    windows: int | None = None
    zeroshot: tuple[str, ...] = ()  # lm-eval tasks, e.g. the paper's: boolq,rte,hellaswag,winogrande,arc_easy,...
    zeroshot_limit: int | None = None  # at most this many examples per task (reported as partial)
    zeroshot_include: str | None = None  # a folder of extra lm-eval task YAMLs (local tasks)

    def __post_init__(self):
        if not isinstance(self.source, str) or not source_ok(self.source, EVAL_SOURCES):
            raise ConfigError("eval.source", f"unknown evaluation source {self.source!r}",
                              f"use one of {', '.join(EVAL_SOURCES)} or file:PATH")
        object.__setattr__(self, "zeroshot", eval_tasks(self.zeroshot))
        check_optional_int("eval.zeroshot_limit", self.zeroshot_limit, 1, "use at least 1 example per task")
        check_include(self.zeroshot_include)
        check_optional_int("eval.seqlen", self.seqlen, 2, "use a window of at least 2 tokens, e.g. 2048")
        check_optional_int("eval.windows", self.windows, 1, "use at least 1 window, or leave it out for all")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; ``to_dict`` / ``from_dict`` round-trip through YAML and JSON."""

    model: str = "smollm2-135m"
    prune: PruneConfig = field(default_factory=PruneConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    ebft: EbftConfig = field(default_factory=EbftConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: tuple[str, ...] = ()
    recoveries: tuple[str, ...] = ("ebft",)
    device: str = "auto"
    dtype: str = "auto"
    activations: str = "auto"
    seed: int = 0
    runs_dir: str = "runs"
    save_model: str | None = None
    json_out: str | None = None

    def __post_init__(self):
        check_model(self.model)
        baselines = baseline_names(self.baselines)
        object.__setattr__(self, "baselines", tuple(dict.fromkeys(baselines)))
        check_baselines(baselines, self.prune)
        object.__setattr__(self, "recoveries", recovery_names(self.recoveries))
        if not (isinstance(self.device, str) and self.device.startswith("cuda:")):
            check_choice("device", self.device, DEVICES, "device", "use auto, cpu, cuda or cuda:N")
        check_choice("dtype", self.dtype, DTYPES, "dtype", f"use one of {', '.join(DTYPES)}")
        check_choice("activations", self.activations, ACTIVATIONS, "placement",
                     "use auto (the planner decides), device or host")
        check_int("seed", self.seed, 0, "use a non-negative integer seed")
        for name in ("runs_dir", "save_model", "json_out"):
            check_path(name, getattr(self, name))
        recoveries = [registry.recovery_entry(r).build() for r in self.recoveries]
        check_sections(self.calib, self.eval, self.ebft, trains_blocks=any(r.trains for r in recoveries))
        learning = [name for name, r in zip(self.recoveries, recoveries) if getattr(r, "learns_masks", False)]
        if learning and self.prune.structured:
            raise ConfigError("recoveries", f"{learning[0]} learns masks, and structured pruning leaves none (its "
                              "matrices shrink)", "use ebft or ebft-gp after llm-pruner")

    # ---- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prune"] = self.prune.to_dict()
        d["baselines"] = list(self.baselines)
        d["recoveries"] = list(self.recoveries)
        d["eval"]["zeroshot"] = list(self.eval.zeroshot)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build a config from a nested dict; unknown keys and wrong types raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError("config", f"expected a mapping of fields, got {type(data).__name__}",
                              "write the preset as 'field: value' lines")
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config", f"no such preset file {str(p)!r}", "check the path, e.g. "
                              "assets/presets/smollm2-demo.yaml")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError("config", f"{p} is not valid YAML ({e.__class__.__name__})",
                              "fix the syntax; each line is 'field: value'") from None
        return cls.from_dict(data or {})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """Return a copy with dotted-name fields replaced, e.g. ``{"prune.sparsity": 0.7}``.

        A sparsity that was never chosen (the default of the method and pattern) follows a new method or pattern:
        ``RunConfig().with_overrides({"prune.method": "llm-pruner"})`` prunes 20%, as the same config written
        whole would.
        """
        data = self.to_dict()
        keys = {str(k) for k in overrides}
        if keys & {"prune.method", "prune.pattern"} and "prune.sparsity" not in keys and \
                self.prune.sparsity == self.prune.default_sparsity:
            data["prune"]["sparsity"] = None
        for key, value in overrides.items():
            node = data
            *parents, leaf = str(key).split(".")
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
                if not isinstance(node, dict):
                    raise ConfigError(str(key), "is not a known field", "use a name like prune.sparsity")
            node[leaf] = value
        return RunConfig.from_dict(data)


_SECTIONS = {"prune": PruneConfig, "calib": CalibConfig, "ebft": EbftConfig, "lora": LoraConfig,
             "eval": EvalConfig}


def section_fields() -> dict[str, dict[str, tuple[str, Any]]]:
    """Every field of every section: section -> field -> (its type as written, its default). The prune section
    holds the registered methods' options too (``registry.option_fields``)."""
    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    out = {name: {f.name: (str(f.type), default(f)) for f in fields(cls)} for name, cls in _SECTIONS.items()}
    out["prune"] = {name: kind_default for name, kind_default in out["prune"].items() if name != "options"}
    out["prune"].update({name: (str(f.type), f.default) for name, (_e, f) in registry.option_fields().items()})
    return out


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name: str(f.type) for f in fields(cls)} if cls is not PruneConfig else \
        {"method": "str", "sparsity": "float | None", "pattern": "str", **dict.fromkeys(registry.option_defaults())}
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise ConfigError(prefix + unknown[0], "is not a known field",
                          f"use one of {', '.join(known)} (check the spelling)")
    kwargs = {}
    for key, value in data.items():
        name = prefix + key
        if key in _SECTIONS and prefix == "":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(name, f"expected a section of fields, got {value!r}",
                                  f"write it as '{key}: {{field: value}}'")
            kwargs[key] = _build(_SECTIONS[key], value, name + ".")
        else:  # a method's option (no annotation here) is converted by the registry
            kwargs[key] = coerce(name, value, known[key]) if known[key] else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a wrongly typed value that a comparison inside validation tripped over
        raise ConfigError(prefix.rstrip(".") or "config", f"a field has the wrong type ({e})",
                          "check each value against the README's table of options") from None
