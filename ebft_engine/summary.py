"""The run summary (summary.json, ``--json-out``, RunFinished.summary) as a typed object.

:class:`RunSummary` holds what a run measured; :meth:`RunSummary.to_dict` is the one place its JSON shape is
written (key names, nesting and order, unchanged since summary.json files were first read by other tools), and
:meth:`RunSummary.from_dict` reads any summary a run folder may hold, older ones included: a key a file lacks
reads as empty (or None), as every reader did by hand before. The evaluation protocol in words is composed
here only: :meth:`EvalInfo.protocol`.

Units: seconds of wall-clock time, memory in GiB (2**30 bytes), sparsities as fractions in [0, 1],
parameter and weight counts as plain integers.

No torch here: the lab and the command line read summaries without loading the engine's heavy parts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

# Said after the sequence length when it is LLM-Pruner's 128 tokens, so a reader does not compare it with
# figures measured at 2048.
PROTOCOL_128 = " (LLM-Pruner's 128-token protocol: reads higher than at 2048)"


def _dict(value: Any) -> dict:
    """A copy of ``value`` if it is a mapping; else an empty dict (a key missing, null, or of another type)."""
    return dict(value) if isinstance(value, Mapping) else {}


def _list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _known(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that name a field of dataclass ``cls`` (older and newer files may have others)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


class _Part:
    """A flat part of the summary: its JSON keys are its fields, in their order; a key a file lacks reads as the
    field's default, a key it does not know is ignored."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None):
        return cls(**_known(cls, _dict(data)))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class EvalInfo(_Part):
    """How perplexity was measured: ``windows`` of ``seqlen`` tokens from ``source``.

    Attributes:
        source: the eval source as configured (wikitext2, c4, ptb or file:PATH).
        description: the source in words (e.g. which split of which data set), when known.
        seqlen: tokens per window.
        windows: windows evaluated; total_windows: windows the text holds (None when not known, e.g. in a
            live view folded from events only).
        tokens: tokens evaluated (windows x seqlen).
        partial: True when fewer windows than the text holds were evaluated.
    """

    source: str | None = None
    description: str | None = None
    seqlen: int | None = None
    windows: int | None = None
    total_windows: int | None = None
    tokens: int | None = None
    partial: bool | None = None

    def merged(self, other: EvalInfo | None) -> EvalInfo:
        """This, with every field ``other`` knows (not None) taken from ``other``."""
        if other is None:
            return self
        return replace(self, **{k: v for k, v in other.to_dict().items() if v is not None})

    def protocol(self) -> str:
        """The protocol in one sentence, e.g. ``file:a.txt, seqlen 128 (LLM-Pruner's 128-token protocol: reads
        higher than at 2048), 8 of 26 windows (partial), 1024 tokens``: the one wording of it everywhere."""
        windows = (f"{self.windows} of {self.total_windows} windows" if self.total_windows
                   else f"{self.windows} windows")
        note = PROTOCOL_128 if self.seqlen == 128 else ""
        tokens = "" if self.tokens is None else f", {self.tokens} tokens"
        return (f"{self.description or self.source}, seqlen {self.seqlen}{note}, {windows} "
                f"({'partial' if self.partial else 'full'}){tokens}")


def protocol(info: EvalInfo | Mapping[str, Any] | None) -> str:
    """:meth:`EvalInfo.protocol` of an EvalInfo or its dict; "" when there is none (nothing evaluated yet)."""
    if isinstance(info, Mapping):
        info = EvalInfo.from_dict(info) if info else None
    return "" if info is None else info.protocol()


@dataclass
class CalibInfo(_Part):
    """The calibration set: ``nsamples`` sequences of ``seqlen`` tokens from ``source``, plus ``self_nsamples``
    the dense model wrote itself (for the reconstruction only; 0 in runs from before that option);
    ``tokens``: calibration tokens in all."""

    source: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    self_nsamples: int = 0
    tokens: int | None = None


@dataclass
class BlockRow(_Part):
    """One block trained by an EBFT variant: its reconstruction loss (mean squared error against the target)
    before and after training (None when not finite), the seconds the block took, its sparsity (a fraction).
    Rows of runs from before variants were labelled have no label: they are EBFT's."""

    label: str = "ebft"
    index: int | None = None
    initial_loss: float | None = None
    final_loss: float | None = None
    seconds: float | None = None
    sparsity: float | None = None


@dataclass
class DeadChannels:
    """Weights one variant's masks kept but that are zero because their input channel never fires (as the
    reference SparseGPT zeroes them): ``blocks`` maps a block index (as text) to layer -> weights."""

    blocks: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        """Dead-channel weights in all blocks."""
        return sum(n for per_layer in self.blocks.values() for n in per_layer.values())

    @property
    def layers(self) -> int:
        """Layers with at least one dead-channel weight counted."""
        return sum(len(per_layer) for per_layer in self.blocks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "layers": self.layers, "blocks": dict(self.blocks)}


@dataclass
class LoraInfo(_Part):
    """The LoRA recovery: ``steps`` optimizer steps over ``epochs`` (a fraction of epochs when the budget ran
    out) in ``seconds``; ``adapter_params`` trainable adapter weights on the ``targets`` projections, of rank
    ``rank`` and scale ``alpha``; ``budget`` in words ("ebft's time" or "N epochs"); the language-model loss
    of the first and last steps (None when no step ran)."""

    steps: int | None = None
    epochs: float | None = None
    seconds: float | None = None
    adapter_params: int | None = None
    targets: list[str] = field(default_factory=list)
    rank: int | None = None
    alpha: float | None = None
    budget: str | None = None
    first_loss: float | None = None
    last_loss: float | None = None


@dataclass
class PrecisionInfo(_Part):
    """Where the blocks ran (``device``, e.g. cuda:0 or cpu) and the dtype names of the stored weights
    (``storage``) and of the matmuls under autocast (``compute``; "none": no autocast, the storage dtype)."""

    device: str | None = None
    storage: str | None = None
    compute: str | None = None

    @classmethod
    def of(cls, precision) -> PrecisionInfo:
        """From a :class:`ebft_engine.device.Precision`."""
        return cls(str(precision.device), dtype_name(precision.storage), dtype_name(precision.compute))


def dtype_name(dtype) -> str:
    return "none" if dtype is None else str(dtype).replace("torch.", "")


GIB = 1024 ** 3  # bytes in a GiB (planner.GiB)


@dataclass
class PhaseMemory(_Part):
    """The memory planner's predicted peak of one phase, in GiB (rounded to 0.001), on the device and on the
    host."""

    device_gib: float = 0.0
    host_gib: float = 0.0


@dataclass
class MemoryPlanInfo:
    """The memory plan the run started with: where calibration activations live (``activations``: device or
    host) and each phase's predicted peak (load, data, eval, prune, ebft, ...)."""

    activations: str | None = None
    phases: dict[str, PhaseMemory] = field(default_factory=dict)

    @classmethod
    def of(cls, plan) -> MemoryPlanInfo:
        """From a :class:`ebft_engine.planner.MemoryPlan` (its phases' peaks are in bytes)."""
        return cls(plan.activations, {ph.phase: PhaseMemory(round(ph.device / GIB, 3), round(ph.host / GIB, 3))
                                      for ph in plan.phases})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryPlanInfo:
        phases = {name: PhaseMemory.from_dict(ph) for name, ph in _dict(data.get("phases")).items()}
        return cls(data.get("activations"), phases)

    def to_dict(self) -> dict[str, Any]:
        return {"activations": self.activations, "phases": {name: ph.to_dict() for name, ph in self.phases.items()}}


@dataclass
class RunError(_Part):
    """Why a run failed: the message, and the configuration field a ConfigError named (else None)."""

    field: str | None = None
    message: str = ""


@dataclass
class RunSummary:
    """What one run measured, and how (summary.json). Per-variant mappings are keyed by the variant's label
    (dense, the baselines' method names, ebft, ebft-gp, lora, lora-merged, llm-pruner, ...).

    Attributes:
        run_id: the run folder's name. status: running, finished, cancelled or failed (a file without one, or
            a running one whose process is gone, reads as interrupted: record.status_of).
        model: the model as configured (hub id, folder, .gguf file or built-in name).
        ppl: label -> perplexity on the evaluation protocol (``eval``).
        actual_sparsity: label -> fraction of the dense linear layers' weights removed, as measured.
        mask_sha256: label -> the first 16 hex digits of the SHA-256 of its masks (and kept groups).
        sparsity_profile: label -> each block's target sparsity (fractions, rounded to 1e-6).
        blocks: the per-block rows of the EBFT variants, in the order the blocks finished.
        lora: the LoRA recovery, None when it did not run.
        zeroshot: label -> lm-eval task -> metric (acc, acc_norm, ...) -> value.
        params: label -> parameters in the whole model (smaller after structured pruning).
        structure: label -> each block's kept heads and channels (structured pruning; None for a whole block).
        dead_channel_weights: label -> the weights zeroed because their input channel never fires.
        eval, calibration: the data, None until the data phase ran.
        seconds: phase (load, data, eval:<label>, prune:<label>, ebft:<label>, lora:lora, zeroshot:<label>,
            save) -> wall-clock seconds, summed over resumes; "total": the whole run's, resumes included.
        precision, memory_plan: None until the model's config was read.
        config: the run's configuration (RunConfig.to_dict()). pid: the process writing it (None in files from
            before it was recorded). error: why the run failed, None otherwise.
        elapsed_before: seconds the run spent before it was resumed (not written: it is in seconds["total"]).
    """

    run_id: str = ""
    status: str = "running"
    model: str | None = None
    ppl: dict[str, float] = field(default_factory=dict)
    actual_sparsity: dict[str, float] = field(default_factory=dict)
    mask_sha256: dict[str, str] = field(default_factory=dict)
    sparsity_profile: dict[str, list[float]] = field(default_factory=dict)
    blocks: list[BlockRow] = field(default_factory=list)
    lora: LoraInfo | None = None
    zeroshot: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    structure: dict[str, list[dict[str, int] | None]] = field(default_factory=dict)
    dead_channel_weights: dict[str, DeadChannels] = field(default_factory=dict)
    eval: EvalInfo | None = None
    calibration: CalibInfo | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    precision: PrecisionInfo | None = None
    memory_plan: MemoryPlanInfo | None = None
    config: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    error: RunError | None = None
    elapsed_before: float = field(default=0.0, repr=False, compare=False)

    # ---- reading and writing ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunSummary:
        """Read a summary as summary.json or RunFinished holds it, of any age: a missing (or null) key reads
        as empty or None, keys this version does not know are ignored."""
        data = _dict(data)
        error, precision, plan = data.get("error"), data.get("precision"), data.get("memory_plan")
        lora, ev, calib = _dict(data.get("lora")), _dict(data.get("eval")), _dict(data.get("calibration"))
        return cls(
            run_id=str(data.get("run_id") or ""), status=data.get("status", "interrupted"), model=data.get("model"),
            ppl=_dict(data.get("ppl")), actual_sparsity=_dict(data.get("actual_sparsity")),
            mask_sha256=_dict(data.get("mask_sha256")), sparsity_profile=_dict(data.get("sparsity_profile")),
            blocks=[BlockRow.from_dict(b) for b in _list(data.get("blocks")) if isinstance(b, Mapping)],
            lora=LoraInfo.from_dict(lora) if lora else None, zeroshot=_dict(data.get("zeroshot")),
            params=_dict(data.get("params")), structure=_dict(data.get("structure")),
            dead_channel_weights={label: DeadChannels(_dict(_dict(entry).get("blocks")))
                                  for label, entry in _dict(data.get("dead_channel_weights")).items()},
            eval=EvalInfo.from_dict(ev) if ev else None, calibration=CalibInfo.from_dict(calib) if calib else None,
            seconds=_dict(data.get("seconds")),
            precision=PrecisionInfo.from_dict(precision) if isinstance(precision, Mapping) else None,
            memory_plan=MemoryPlanInfo.from_dict(plan) if isinstance(plan, Mapping) else None,
            config=_dict(data.get("config")), pid=data.get("pid"),
            error=RunError.from_dict(error) if isinstance(error, Mapping) else None)

    def to_dict(self) -> dict[str, Any]:
        """The summary.json shape: these keys in this order, every part a fresh dict or list (what a later
        change of this object does not reach). Not yet strict JSON: record.write_json_atomic writes a value
        that is not finite as null."""
        return {
            "run_id": self.run_id, "status": self.status, "model": self.model,
            "ppl": dict(self.ppl), "actual_sparsity": dict(self.actual_sparsity),
            "mask_sha256": dict(self.mask_sha256), "sparsity_profile": dict(self.sparsity_profile),
            "blocks": [b.to_dict() for b in self.blocks],
            "lora": {} if self.lora is None else self.lora.to_dict(), "zeroshot": dict(self.zeroshot),
            "params": dict(self.params), "structure": dict(self.structure),
            "dead_channel_weights": {label: dead.to_dict() for label, dead in self.dead_channel_weights.items()
                                     if dead.blocks},
            "eval": {} if self.eval is None else self.eval.to_dict(),
            "calibration": {} if self.calibration is None else self.calibration.to_dict(),
            "seconds": dict(self.seconds),
            "precision": None if self.precision is None else self.precision.to_dict(),
            "memory_plan": None if self.memory_plan is None else self.memory_plan.to_dict(),
            "config": dict(self.config), "pid": self.pid,
            "error": None if self.error is None else self.error.to_dict(),
        }

    # ---- what readers ask -------------------------------------------------------------------------------
    def protocol(self) -> str:
        """The evaluation protocol in words (:meth:`EvalInfo.protocol`); "" before the data phase ran."""
        return protocol(self.eval)

    @property
    def structured(self) -> bool:
        """Whether the run pruned structurally (whole heads and channels: its models have fewer parameters)."""
        return _dict(self.config.get("prune")).get("pattern") == "structured"

    # ---- what the pipeline writes -----------------------------------------------------------------------
    @classmethod
    def start(cls, run_id: str, config: Mapping[str, Any], previous: Mapping[str, Any] | None = None) -> RunSummary:
        """A new run's summary (status running), or a resumed one's: with ``previous`` (its summary.json as a
        dict), everything already measured is carried over: perplexities, sparsities, mask digests, profiles,
        block rows, LoRA, zero-shot results, parameter counts, structures, dead-channel counts and phase
        seconds (its "total" becomes ``elapsed_before``). The data, precision, memory plan and error are found
        again by the resumed run."""
        prev = cls.from_dict(previous) if previous else cls()
        seconds = {k: float(v) for k, v in prev.seconds.items() if isinstance(v, (int, float))}
        elapsed_before = seconds.pop("total", 0.0)
        return cls(run_id=run_id, status="running", model=config.get("model"), ppl=prev.ppl,
                   actual_sparsity=prev.actual_sparsity, mask_sha256=prev.mask_sha256,
                   sparsity_profile=prev.sparsity_profile, blocks=prev.blocks, lora=prev.lora, zeroshot=prev.zeroshot,
                   params=prev.params, structure=prev.structure, dead_channel_weights=prev.dead_channel_weights,
                   seconds=seconds, config=dict(config), elapsed_before=elapsed_before)

    def snapshot(self, status: str, elapsed: float) -> dict[str, Any]:
        """Set the status, seconds["total"] (``elapsed_before`` + ``elapsed``, the seconds since this process
        took the run up) and this process's pid; return :meth:`to_dict`, for summary.json."""
        self.status, self.pid = status, os.getpid()
        self.seconds["total"] = self.elapsed_before + elapsed
        return self.to_dict()

    def add_seconds(self, key: str, seconds: float) -> None:
        """Add a phase's wall-clock ``seconds`` to ``key`` (phase, or phase:label)."""
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def restart_blocks(self, label: str, start: int) -> None:
        """Before variant ``label`` runs from block ``start``: drop its rows of blocks ``start`` and on (a row
        without an index too); keep the other variants' rows."""
        self.blocks = [b for b in self.blocks if b.label != label or (b.index is not None and b.index < start)]

    def restart_dead_channels(self, label: str, start: int) -> None:
        """Before variant ``label`` runs from block ``start``: keep its dead-channel counts of the blocks
        before ``start`` (restored from checkpoints), drop the rest (they are counted again)."""
        kept = self.dead_channel_weights.get(label, DeadChannels()).blocks
        self.dead_channel_weights[label] = DeadChannels({b: d for b, d in kept.items() if int(b) < start})

    def add_dead_channels(self, label: str, block: int, counts: Mapping[str, int]) -> bool:
        """Record block ``block``'s dead-channel weights per layer (layers with none are left out); False when
        it has none, and nothing was recorded."""
        nonzero = {name: n for name, n in counts.items() if n}
        if nonzero:
            self.dead_channel_weights.setdefault(label, DeadChannels()).blocks[str(block)] = nonzero
        return bool(nonzero)
