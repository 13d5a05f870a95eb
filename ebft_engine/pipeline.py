"""The block loop: load, calibrate, evaluate dense, then for each pruned variant prune (and for EBFT train)
block by block, propagate, and evaluate. ``run(config)`` is a generator of events (see events.py).

One block at a time sits on the device; the model and the calibration activations stay in host memory.
The dense weights are loaded once: when a run compares several variants, the dense block weights are kept
in memory and restored before each variant instead of being read from disk again.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .data import calibration_tokens, evaluation_tokens, read_text_file, self_cache_path
from .device import Precision, check_finite, non_finite, pick_device, pick_precision
from .errors import Cancelled, ConfigError, EbftError
from .events import (BlockFinished, BlockStarted, EvalFinished, Event, Notice, PhaseFinished, PhaseStarted,
                     RunFinished, RunStarted, ZeroShotFinished)
from .evaluate import INFER_BATCH, perplexity
from .finetune import finetune_block
from .finetune.lora import lora_adapters, merge_and_remask, train_lora
from .identity import check_same_model, model_identity, read_identity, write_identity
from .models import (FileBackedBlocks, LlamaAdapter, count_params, load_config, load_model_cached, read_structure,
                     resolve_source, restore_blocks, save_structure)
from .planner import GiB, MemoryPlan, capacities, is_out_of_memory, oom_remedy, plan_memory, remedy
from .checkpoint import Checkpoints, mask_digest_update, new_digest
from .record import RunRecord, new_run_id, read_summary, status_of, write_json_atomic
from .config import OWL_PREFIX, STRUCTURED_METHODS
from .sparsity import StatsCollector, get_method
from .sparsity import structured as st
from .sparsity.wanda import wanda_scores

log = logging.getLogger(__name__)

DEFAULT_EVAL_SEQLEN_CAP = 2048


def _predicate(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return cancel.is_set
    return cancel


def run(config: RunConfig, cancel: threading.Event | Callable[[], bool] | None = None) -> Iterator[Event]:
    """Run one experiment and yield its events; the last one is always RunFinished with the summary.

    Args:
        config: the validated run configuration.
        cancel: a threading.Event (or a callable returning True) that stops the run between steps; the
            partial summary is still written, with status ``cancelled``, and the run can be resumed.

    Raises:
        EbftError: before any event and before a run folder exists, for what :func:`preflight` refuses
            (ConfigError, ModelLoadError, DataError), or if the run folder cannot be written.
    """
    preflight(config)
    record = RunRecord(config.runs_dir, new_run_id())
    yield from _drive(_Run(config, record, _predicate(cancel)), resumed=False)


def preflight(config: RunConfig) -> None:
    """Refuse, before a run folder exists, what can be known wrong without a weight: a device that is not here,
    a text file that is not there, a model whose config cannot be read (a path that does not exist, a folder
    without config.json, a hub id out of reach: ModelLoadError), and settings the model's config rules out
    (context length, N:M widths, structured pruning's blocks: ConfigError)."""
    pick_device(config.device)
    for field, source in (("calib.source", config.calib.source), ("eval.source", config.eval.source)):
        if source.startswith("file:"):
            read_text_file(source, field)  # DataError: missing, unreadable or empty
    source = resolve_source(config.model)
    model_config = load_config(source)
    check_against_model(config, model_config, read_structure(source))


def check_against_model(cfg: RunConfig, model_config, structure: list | None = None) -> int:
    """Refuse what this model cannot do with ``cfg`` (ConfigError); return the evaluation window length.

    Args:
        structure: per-block counts of a saved structurally pruned model (models.read_structure), whose blocks
            are smaller than its config says.
    """
    context = int(getattr(model_config, "max_position_embeddings", 2048))
    eval_seqlen = cfg.eval.seqlen or min(context, DEFAULT_EVAL_SEQLEN_CAP)
    for name, value in (("calib.seqlen", cfg.calib.seqlen), ("eval.seqlen", eval_seqlen)):
        if value > context:
            raise ConfigError(name, f"{value} tokens is beyond the model's context of {context}",
                              f"use at most {context}")
    if cfg.prune.structured:
        n = model_config.num_hidden_layers
        pruned = st.pruned_blocks(n, cfg.prune.keep_first, cfg.prune.keep_last)
        if not pruned:
            raise ConfigError("prune.keep_first", f"keeping the first {cfg.prune.keep_first} and last "
                              f"{cfg.prune.keep_last} blocks whole leaves none of the model's {n} to prune",
                              "lower --keep-first / --keep-last")
        sizes = [sum(st.dense_numel(model_config, c).values()) for c in structure or [None] * n]
        ratio = st.block_ratio(cfg.prune.sparsity, sizes, pruned)
        if ratio > 0.9:
            most = 0.9 * cfg.prune.sparsity / ratio
            raise ConfigError("prune.sparsity", f"removing {cfg.prune.sparsity:g} of all blocks' weights from "
                              f"only {len(pruned)} of {n} blocks takes {ratio:.0%} of each",
                              f"use a sparsity up to {most:.2f}, or keep fewer blocks whole (--keep-first, "
                              "--keep-last)")
        if cfg.prune.taylor_seqlen > cfg.calib.seqlen or cfg.prune.taylor_samples > cfg.calib.nsamples:
            raise ConfigError("prune.taylor_samples", f"the importance pass takes {cfg.prune.taylor_samples} x "
                              f"{cfg.prune.taylor_seqlen} tokens from {cfg.calib.nsamples} calibration samples "
                              f"of {cfg.calib.seqlen}", "use at most as many samples and tokens as calibration has")
    if cfg.prune.nm is not None:
        _check_nm_widths(cfg.prune.pattern, cfg.prune.nm[1], model_config, structure)
    return eval_seqlen


def _check_nm_widths(pattern: str, m: int, model_config, structure: list | None) -> None:
    """N:M groups run along a layer's input columns: every pruned layer's input width must be a multiple of M
    (q/k/v, gate/up read the hidden size, o_proj the heads' width, down_proj the MLP's)."""
    heads = model_config.num_attention_heads
    hd = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads  # for the message
    widths: dict[tuple[str, int], list[int]] = {}  # (layer, input width) -> blocks
    for i in range(model_config.num_hidden_layers):
        counts = structure[i] if structure and i < len(structure) and isinstance(structure[i], dict) else None
        for name, (n_in, _out) in st.dense_shapes(model_config, counts).items():
            widths.setdefault((name, n_in), []).append(i)
    bad: dict[tuple[int, tuple[int, ...], str], list[str]] = {}  # (width, blocks, why) -> layers reading it
    for (name, n_in), blocks in widths.items():
        if n_in % m:
            why = f" ({heads} heads x head_dim {hd})" if name == "o_proj" and n_in == heads * hd else ""
            bad.setdefault((n_in, tuple(blocks), why), []).append(name)
    if not bad:
        return

    def where(n_in: int, blocks: tuple[int, ...], why: str, names: list[str]) -> str:
        scope = "" if len(blocks) == model_config.num_hidden_layers else \
            f" in block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}"
        return f"{', '.join(names)} read{'s' if len(names) == 1 else ''} {n_in} columns{why}{scope}"

    divisor = math.gcd(*(n_in for (_name, n_in) in widths))
    fits = [p for p in ("2:4", "4:8") if divisor % int(p.split(":")[1]) == 0]
    fix = (f"use an N:M pattern whose M divides every layer's width (all are multiples of {divisor})"
           f"{', such as ' + fits[0] if fits else ''}, or --pattern unstructured") if divisor > 1 else \
        "no N:M pattern divides every layer's width; use --pattern unstructured"
    raise ConfigError("prune.pattern", f"{pattern} groups every {m} input columns of a layer, and "
                      f"{'; '.join(where(*key, names) for key, names in bad.items())}, not a multiple of {m}", fix)


# What a resumed run may change: how the remaining blocks fit in memory, not what they compute from.
RESUME_OVERRIDES = ("ebft.batch_size", "activations")
# ... and where its output goes besides its own folder (nothing it computes depends on these).
OUTPUT_OVERRIDES = ("json_out",)


def resume(run_dir: str | Path, cancel: threading.Event | Callable[[], bool] | None = None,
           overrides: dict[str, Any] | None = None) -> Iterator[Event]:
    """Continue a run that was killed, cancelled or failed, in its own folder, from its last finished block.

    Finished perplexities are kept, blocks already checkpointed are restored instead of redone, and the run
    ends with the same masks and perplexities as one that was never interrupted.

    Args:
        overrides: after an out-of-memory failure, a smaller ``ebft.batch_size`` or ``activations: host`` for
            the blocks still to do (RESUME_OVERRIDES), and ``json_out``, where the finished summary is also
            written (OUTPUT_OVERRIDES); nothing else can change mid-run.

    Raises:
        ConfigError: before any event, if the folder is not a resumable run (finished, still running, or not a
            run folder at all), or an override is not allowed.
    """
    config, previous = resumable(run_dir)
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in changes:
        if key not in RESUME_OVERRIDES + OUTPUT_OVERRIDES:
            raise ConfigError(key, "cannot change when resuming (the finished blocks were computed with it)",
                              "resume with the run's own settings, changing at most "
                              f"{', '.join(RESUME_OVERRIDES + OUTPUT_OVERRIDES)}")
    if changes:
        config = config.with_overrides(changes)
    record = RunRecord.reopen(run_dir)
    computing = {k: v for k, v in changes.items() if k in RESUME_OVERRIDES}
    note = Notice("warning", "resumed with " + ", ".join(f"{k}={v}" for k, v in computing.items()) +
                  " for the blocks still to do") if computing else None
    yield from _drive(_Run(config, record, _predicate(cancel), previous=previous), resumed=True, note=note)


def resumable(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any] | None]:
    """(config, previous summary) of a run folder that can be resumed; else ConfigError saying why."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError("resume", f"{str(run_dir)!r} is not a run folder (it has no config.json)",
                          "pass a folder under your runs directory, e.g. runs/20261128-101500-417c2e")
    summary = read_summary(run_dir)
    status = status_of(summary)
    if status == "finished":
        raise ConfigError("resume", f"run {run_dir.name} already finished", "start a new run instead")
    if status == "running":
        raise ConfigError("resume", f"run {run_dir.name} is still running (process {summary.get('pid')})",
                          "stop it first (Ctrl-C or Stop), then resume")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("resume", f"cannot read {config_file} ({e})", "the folder cannot be resumed; start a "
                          "new run with the same settings") from None
    config = RunConfig.from_dict(data)
    if read_identity(run_dir) is not None:  # the model the run started on, against the one there now
        try:
            source = resolve_source(config.model)
            current = model_identity(source, load_config(source))
        except (EbftError, OSError):  # it cannot be read now: loading it will say why
            current = None
        if current is not None:
            check_same_model(run_dir, current)
    return config, summary


def _drive(state: "_Run", resumed: bool, note: Notice | None = None) -> Iterator[Event]:
    record = state.record
    status = "failed"
    try:
        yield state.emit(RunStarted(run_id=record.dir.name, run_dir=str(record.dir), config=state.config.to_dict(),
                                    resumed=resumed))
        if note is not None:
            yield state.emit(note)
        yield from state.execute()
        status = "finished"
    except (Cancelled, KeyboardInterrupt):
        status = "cancelled"
        yield state.emit(Notice("warning", "run cancelled; the partial results are kept in " + str(record.dir) +
                                f" (continue it with: python -m ebft_engine run --resume {record.dir})"))
    except GeneratorExit:  # the consumer stopped listening: record what we have, yield nothing more
        state.finish("cancelled")
        raise
    except EbftError as e:
        state.error = {"field": getattr(e, "field", None), "message": str(e)}
        yield state.emit(Notice("error", str(e)))
    except Exception as e:  # a bug or a torch failure: keep the traceback in the run folder, say it plainly
        if is_out_of_memory(e):  # torch's OutOfMemoryError, or a cuBLAS/cuSOLVER allocation failure
            state.release()
            yield state.emit(Notice("error", state.out_of_memory()))
        else:
            (record.dir / "traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
            yield state.emit(Notice("error", f"internal error ({e.__class__.__name__}: {str(e)[:300]}); "
                                             f"details in {record.dir / 'traceback.txt'}"))
    state.release()
    yield state.emit(RunFinished(status=status, summary=state.finish(status)))
    record.close()


class _Run:
    """State of one run; ``execute`` yields its events in order."""

    def __init__(self, config: RunConfig, record: RunRecord, cancelled: Callable[[], bool],
                 previous: dict[str, Any] | None = None):
        self.config, self.record, self.cancelled = config, record, cancelled
        self.checkpoints = Checkpoints(record.dir)
        self.started = time.perf_counter()
        prev = previous or {}
        self.seconds: dict[str, float] = {k: float(v) for k, v in (prev.get("seconds") or {}).items()}
        self.elapsed_before = self.seconds.pop("total", 0.0)  # time the run spent before it was resumed
        self.ppl: dict[str, float] = dict(prev.get("ppl") or {})
        self.sparsity: dict[str, float] = dict(prev.get("actual_sparsity") or {})
        self.masks: dict[str, str] = dict(prev.get("mask_sha256") or {})
        self.profiles: dict[str, list[float]] = dict(prev.get("sparsity_profile") or {})
        self.lora_info: dict[str, Any] = dict(prev.get("lora") or {})
        self.zeroshot: dict[str, dict[str, Any]] = dict(prev.get("zeroshot") or {})
        self.blocks: list[dict[str, Any]] = list(prev.get("blocks") or [])
        self.params: dict[str, int] = dict(prev.get("params") or {})
        self.structure: dict[str, list[dict[str, int] | None]] = dict(prev.get("structure") or {})
        # label -> block -> layer -> weights kept by the mask but zero because their input channel never fires
        self.dead_weights: dict[str, dict[str, dict[str, int]]] = {
            label: dict(entry.get("blocks") or {}) for label, entry in (prev.get("dead_channel_weights") or {}).items()}
        self.dead_kept: dict[str, torch.Tensor] = {}  # this block's layer -> kept positions in dead input columns
        self.eval_info: dict[str, Any] = {}
        self.calib_info: dict[str, Any] = {}
        self.precision: Precision | None = None
        self.model_config = None
        self.plan: MemoryPlan | None = None
        # what the run is doing, for a message if memory runs out: the stage picks the remedy (planner.oom_remedy)
        self.stage, self.where = "start", "starting"
        self.finished_summary: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # why the run failed: {"field": a ConfigError's or None, "message"}
        self.kept: dict[int, dict[str, list[int]]] = {}
        record.write_config(config.to_dict())
        record.write_summary(self._summary("running"))  # a crash leaves this: the folder says it never finished

    def emit(self, event: Event) -> Event:
        self.record.append(event)
        return event

    # ---- phases -----------------------------------------------------------------------------------------
    def execute(self) -> Iterator[Event]:
        cfg = self.config
        _seed_everything(cfg.seed)
        yield from self._load()
        yield from self._data()
        if "dense" not in self.ppl:  # a resumed run keeps every number it had already measured
            yield from self._evaluate("dense")
        variants = [(b, b, "prune") for b in cfg.baselines]
        recover = [r for r in cfg.recoveries if r == "lora" or cfg.ebft.epochs > 0]
        variants += [(r, cfg.prune.method, r) for r in recover]
        if not recover and cfg.prune.method not in cfg.baselines:
            variants.append((cfg.prune.method, cfg.prune.method, "prune"))

        def done(label: str) -> bool:
            return label in self.ppl and (label != "lora" or "lora-merged" in self.ppl)

        # Variants still to do; the last one again when the model is to be saved, restored from its checkpoint.
        todo = [v for k, v in enumerate(variants)
                if not done(v[0]) or (cfg.save_model and k == len(variants) - 1)]
        if self.dense is None and len(todo) > 1:  # a large model: restore from its files, else keep a copy
            self.dense = FileBackedBlocks.find(self.source, self.model)
            if self.dense is None:
                self.dense = [p.detach().clone() for p in self.adapter.blocks.parameters()]
                gib = sum(t.numel() * t.element_size() for t in self.dense) / GiB
                yield self.emit(Notice("warning", f"the model has no local safetensors files to restore its dense "
                                                  f"blocks from between variants: keeping a {gib:.1f} GiB copy in "
                                                  "host memory instead"))
        for k, (label, method, kind) in enumerate(todo):
            if k > 0:
                restore_blocks(self.model, self.dense)
            if kind == "lora":
                yield from self._lora(method)
                continue
            yield from self._block_loop(label, method, kind != "prune", gp=kind == "ebft-gp")
            if label not in self.ppl:
                yield from self._evaluate(label)
        self.dense = None
        if cfg.save_model:
            yield from self._timed("save", "", self._save)

    def _timed(self, phase: str, label: str, work: Callable[[], Any]) -> Iterator[Event]:
        yield self.emit(PhaseStarted(phase, label))
        t = time.perf_counter()
        work()
        yield self.emit(self._phase_done(phase, label, t))

    def _phase_done(self, phase: str, label: str, started: float) -> PhaseFinished:
        seconds = time.perf_counter() - started
        key = f"{phase}:{label}" if label else phase
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        return PhaseFinished(phase, label, seconds)

    def _load(self) -> Iterator[Event]:
        cfg = self.config
        yield self.emit(PhaseStarted("load", cfg.model))
        t = time.perf_counter()
        source = self.source = resolve_source(cfg.model)
        model_config = load_config(source)
        self._check_against_model(model_config)
        device = pick_device(cfg.device)
        self.precision = pick_precision(device, cfg.dtype, count_params(model_config))
        self.model_config = model_config
        yield self.emit(self._plan(model_config))
        self._check_disk(model_config)
        self.model, self.tokenizer, self.dense = load_model_cached(source, self.precision.storage,
                                                                   count_params(model_config))
        self.adapter = LlamaAdapter(self.model)
        # the model this run is on, recorded when it starts; a resumed run must be on the same one
        identity = model_identity(source, model_config)
        if read_identity(self.record.dir) is None:
            write_identity(self.record.dir, identity)
        else:
            check_same_model(self.record.dir, identity)
        # the dense sizes every sparsity is measured against, per block (a structurally pruned block has smaller
        # matrices; a model saved structurally pruned is loaded with them, and they are its dense sizes)
        self.dense_numel = [st.dense_numel(model_config, c) for c in st.loaded_counts(self.model)]
        self.params.setdefault("dense", sum(t.numel() for t in self.model.parameters()))
        p = self.precision
        yield self.emit(Notice("info", f"loaded {source.label}: {self.adapter.num_blocks} blocks, "
                                       f"{sum(t.numel() for t in self.model.parameters()) / 1e6:.0f}M parameters; "
                                       f"device {p.device}, "
                                       f"weights {_name(p.storage)}, compute {_name(p.compute)}"))
        yield self.emit(self._phase_done("load", "", t))

    def _plan(self, model_config) -> Notice:
        """Predict peak memory before any weight is loaded; refuse a run that cannot fit, saying what would."""
        cfg, p = self.config, self.precision
        device_capacity, host_capacity = capacities(p.device)
        self.plan = plan_memory(model_config, cfg, p, device_capacity=device_capacity, host_capacity=host_capacity,
                                gguf=self.source.gguf_file is not None)
        if self.plan.problem:
            raise ConfigError("memory", self.plan.problem, remedy(self.plan, model_config, cfg, p))
        return Notice("info", self.plan.summary())

    def _check_disk(self, model_config) -> None:
        """The checkpoints of one variant must fit in the runs folder: refuse now rather than at block 20."""
        from .checkpoint import estimate_bytes
        from .planner import Shape

        shape = Shape.of(model_config)
        need = estimate_bytes(shape.layers * shape.block_params, self.precision.storage.itemsize,
                              self.config.prune.sparsity) + 64 * 1024 ** 2
        free = shutil.disk_usage(self.record.dir).free
        if free < need:
            raise ConfigError("runs_dir", f"{self.record.dir.parent} has {free / GiB:.2f} GiB free and this run's "
                              f"block checkpoints need about {need / GiB:.2f} GiB",
                              "free some space or choose another folder with --runs-dir")

    def out_of_memory(self) -> str:
        """The message for a device out-of-memory: where, what to change for the stage that ran out (only EBFT
        training reacts to --batch-size), and how to go on: resume where the change is allowed on resume."""
        fix, resumable_fix = oom_remedy(self.stage, self.model_config, self.config, self.precision,
                                        None if self.plan is None else self.plan.device_capacity)
        then = (f"then continue with python -m ebft_engine run --resume {self.record.dir} and that flag"
                if resumable_fix else
                "then start a new run with it (the finished numbers stay in this run's summary)")
        return f"out of device memory in {self.where}; {fix}, {then}"

    def release(self) -> None:
        """After a failure: every block back on the host in the storage dtype, no gradients, the cache freed,
        so the process is ready for the next run."""
        adapter, p = getattr(self, "adapter", None), self.precision
        if adapter is not None and p is not None:
            for block in adapter.blocks:
                block.to("cpu", p.storage)
                for param in block.parameters():
                    param.grad = None
                    param.requires_grad_(False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_against_model(self, model_config) -> None:
        self.eval_seqlen = check_against_model(self.config, model_config, read_structure(self.source))

    def _data(self) -> Iterator[Event]:
        cfg = self.config
        yield self.emit(PhaseStarted("data", ""))
        t = time.perf_counter()
        self.eval_ids, description = evaluation_tokens(self.tokenizer, cfg.eval.source, self.eval_seqlen)
        total = self.eval_ids.shape[1] // self.eval_seqlen
        windows = total if cfg.eval.windows is None else min(cfg.eval.windows, total)
        self.eval_info = {"source": cfg.eval.source, "description": description, "seqlen": self.eval_seqlen,
                          "windows": windows, "total_windows": total, "tokens": windows * self.eval_seqlen,
                          "partial": windows < total}
        yield self.emit(Notice("info", f"evaluation: {description}, {windows} of {total} windows of "
                                       f"{self.eval_seqlen} tokens ({'partial' if windows < total else 'full'})"))
        if cfg.calib.source == "self":
            cached = self_cache_path(self.model, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed).is_file()
            yield self.emit(Notice("info", f"calibration: {cfg.calib.nsamples} sequences of {cfg.calib.seqlen} "
                                           "tokens generated by the dense model " +
                                           ("(from the cache)" if cached else "(generating now; cached afterwards)")))
        if cfg.eval.zeroshot:  # before any pruning: say now which tasks' data sets are missing
            from . import zeroshot

            zeroshot.check_tasks(cfg.eval.zeroshot, cfg.eval.zeroshot_include)
        self.calib_ids = calibration_tokens(self.tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen,
                                            cfg.seed, model=self.model, precision=self.precision)
        if cfg.calib.self_nsamples:  # Shin et al.'s mix: generated text for the reconstruction, appended
            cached = self_cache_path(self.model, cfg.calib.self_nsamples, cfg.calib.seqlen, cfg.seed).is_file()
            yield self.emit(Notice("info", f"calibration: {cfg.calib.self_nsamples} sequences generated by the dense "
                                           f"model appended for the reconstruction only " +
                                           ("(from the cache)" if cached else "(generating now; cached afterwards)")))
            generated = calibration_tokens(self.tokenizer, "self", cfg.calib.self_nsamples, cfg.calib.seqlen,
                                           cfg.seed, model=self.model, precision=self.precision)
            self.calib_ids = torch.cat([self.calib_ids, generated])
        self.calib_info = {"source": cfg.calib.source, "nsamples": cfg.calib.nsamples,
                           "seqlen": cfg.calib.seqlen, "self_nsamples": cfg.calib.self_nsamples,
                           "tokens": int(self.calib_ids.numel())}
        yield self.emit(self._phase_done("data", "", t))

    def _evaluate(self, label: str) -> Iterator[Event]:
        self.stage, self.where = "eval", f"the evaluation of {label}"
        yield self.emit(PhaseStarted("eval", label))
        t = time.perf_counter()
        res = perplexity(self.adapter, self.eval_ids, self.eval_seqlen, self.precision,
                         windows=self.config.eval.windows, cancelled=self.cancelled, label=label)
        self.ppl[label] = res.ppl
        self.record.write_summary(self._summary("running"))  # a finished number survives a crash
        done = self._phase_done("eval", label, t)
        yield self.emit(EvalFinished(label=label, ppl=res.ppl, source=self.config.eval.source, seqlen=res.seqlen,
                                     windows=res.windows, tokens=res.tokens, partial=res.partial,
                                     seconds=done.seconds))
        yield self.emit(done)
        if self.config.eval.zeroshot and label not in self.zeroshot:
            yield from self._zero_shot(label)

    def _zero_shot(self, label: str) -> Iterator[Event]:
        from . import zeroshot

        ev, p = self.config.eval, self.precision
        self.stage, self.where = "zeroshot", f"the zero-shot evaluation of {label}"
        yield self.emit(PhaseStarted("zeroshot", label))
        t = time.perf_counter()
        try:
            self.model.to(p.device)
            with p.autocast():
                results = zeroshot.evaluate(self.model, self.tokenizer, ev.zeroshot, str(p.device),
                                            include=ev.zeroshot_include, limit=ev.zeroshot_limit)
        finally:
            self.model.to("cpu")
        self.zeroshot[label] = results
        self.record.write_summary(self._summary("running"))
        done = self._phase_done("zeroshot", label, t)
        yield self.emit(ZeroShotFinished(label=label, results=results, limit=ev.zeroshot_limit, seconds=done.seconds))
        yield self.emit(done)

    # ---- the block loop ---------------------------------------------------------------------------------
    def _block_loop(self, label: str, method_name: str, train: bool, gp: bool = False) -> Iterator[Event]:
        """Prune every block with ``method_name`` (owl-<method>: OWL's per-block sparsity), training it with
        EBFT when ``train``: against the dense block on the sparse inputs, or with ``gp`` against the dense
        model's own stream (global propagation, REFERENCE.md §7)."""
        cfg, p, adapter = self.config, self.precision, self.adapter
        owl = method_name.startswith(OWL_PREFIX)
        structured = method_name in STRUCTURED_METHODS
        method = None if structured else get_method(method_name[len(OWL_PREFIX):] if owl else method_name)
        needs = frozenset() if structured else method.needs_with(cfg.prune)
        phase = "ebft" if train else "prune"
        yield self.emit(PhaseStarted(phase, label))
        t_phase = time.perf_counter()
        needs_forward = train or bool(needs)
        kwargs = adapter.block_kwargs(cfg.calib.seqlen, p.device, p.storage)

        def call(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return adapter.call_block(block, x, kwargs)

        n_blocks = adapter.num_blocks
        start = self.checkpoints.done(label)
        sparsities = [cfg.prune.sparsity] * n_blocks
        if owl:  # from the dense model, before any block of this variant is pruned or restored
            sparsities = yield from self._owl_profile(call)
            yield self.emit(Notice("info", f"OWL per-block sparsity for {label}: " +
                                           ", ".join(f"{s:.3f}" for s in sparsities)))
        scores, first_pruned = None, 0
        self.kept = {}  # block index -> the groups a structurally pruned block kept (for the checkpoint, digest)
        if structured:
            pruned = st.pruned_blocks(n_blocks, cfg.prune.keep_first, cfg.prune.keep_last)
            ratio = st.block_ratio(cfg.prune.sparsity, [sum(d.values()) for d in self.dense_numel], pruned)
            sparsities = [ratio if i in pruned else 0.0 for i in range(n_blocks)]
            first_pruned = pruned[0]
            if start < n_blocks:  # from the dense model, before any block of this variant is pruned or restored
                scores = yield from self._taylor(pruned)
        self.profiles[label] = [round(s, 6) for s in sparsities]
        hidden = self._embed_calibration() if needs_forward else None  # (n, seq, hidden)
        dense_hidden = None
        if gp:  # the dense model's own stream: block i's target is the dense block on dense inputs
            dense_hidden = hidden.clone()
            for i, block in enumerate(list(adapter.blocks)[:start]):  # still dense here: restoring comes next
                self.stage, self.where = "block", f"block {i} of the dense stream"
                block.to(p.device)
                dense_hidden, _ = self._forward(block, call, dense_hidden, keep=True)
                block.to("cpu")
        zeros = total = 0
        digest = new_digest()
        if train:  # the per-block table of this EBFT variant: keep the rows of the blocks being restored
            self.blocks = [b for b in self.blocks if b.get("label", "ebft") != label or b.get("index", n_blocks) < start]
        # the restored blocks' dead-channel counts come from the summary; the blocks still to do count theirs
        self.dead_weights[label] = {b: d for b, d in self.dead_weights.get(label, {}).items() if int(b) < start}
        if start == 0:
            self.checkpoints.start(label)
        else:
            hidden = yield from self._restore(label, start, call, hidden)
            for i, block in enumerate(list(adapter.blocks)[:start]):
                mask_digest_update(digest, adapter.linears(block), self.kept.get(i))
                block_zeros, block_total = _count_zeros(adapter.linears(block), self.dense_numel[i])
                zeros, total = zeros + block_zeros, total + block_total
        for i, block in enumerate(adapter.blocks):
            if i < start:
                continue
            if self.cancelled():
                raise Cancelled()
            t_block = time.perf_counter()
            self.stage, self.where = "block", f"block {i} of {label}"
            yield self.emit(BlockStarted(label, i, n_blocks))
            block.to(p.device)
            stats = StatsCollector(needs)
            targets = None
            if needs_forward and not gp:
                with stats.attach(adapter.linears(block)):
                    targets, _ = self._forward(block, call, hidden, stats=stats, keep=train)
            elif gp:
                if needs:  # the masks still come from the sparse model's own inputs
                    with stats.attach(adapter.linears(block)):
                        self._forward(block, call, hidden, stats=stats, keep=False)
                targets, _ = self._forward(block, call, dense_hidden, keep=True)
                dense_hidden = targets  # the dense output is the next block's dense input
            self.dead_kept = {}
            if structured:
                masks = self._shrink(block, i, scores, sparsities[i])
            else:
                masks = self._prune(block, method, stats, sparsities[i])
            stats = None  # the Hessians and norms are spent: free them before the block trains (as planned)
            initial = final = None
            # A block with nothing pruned (left whole by structured pruning) computes its own target, the dense
            # block on the same inputs, so there is nothing to train; with global propagation its target
            # differs once the stream has passed a pruned block.
            trains = train and (sparsities[i] > 0 or (gp and i > first_pruned))
            if trains:
                block.float()
                result = yield from self._train(block, call, hidden, targets, masks, label, i)
                block.to(p.storage)
                initial = result.initial_loss
                if result.rolled_back:
                    yield self.emit(Notice("warning", f"block {i}: the reconstruction loss became non-finite; the "
                                                      "block was restored to its pruned weights and the run goes on"))
            if needs_forward:
                outputs, final = self._forward(block, call, hidden, targets=targets, keep=True)
                if trains and final > initial:
                    # Training raised the loss on its own data (too high a learning rate for this block):
                    # keep the pruned weights, which reconstruct better, and say so.
                    result.restore_pruned(block)
                    yield self.emit(Notice("warning", f"block {i}: EBFT raised the reconstruction loss "
                                                      f"({initial:.4g} -> {final:.4g}); kept the pruned weights. "
                                                      "A lower learning rate may help"))
                    outputs, final = self._forward(block, call, hidden, targets=targets, keep=True)
                hidden = outputs
            kept = {name: int(torch.count_nonzero(l.weight)) for name, l in adapter.linears(block).items()}
            layers = {name: 1 - n / self.dense_numel[i][name] for name, n in kept.items()}
            block_total = sum(self.dense_numel[i][name] for name in kept)
            block_zeros = block_total - sum(kept.values())
            mask_digest_update(digest, adapter.linears(block), self.kept.get(i))
            dead = {name: int((kept_pos & (adapter.linears(block)[name].weight == 0)).sum())
                    for name, kept_pos in self.dead_kept.items()}
            if any(dead.values()):  # recorded before the checkpoint: a restored block's count is in the summary
                self.dead_weights[label][str(i)] = {name: n for name, n in dead.items() if n}
                self.record.write_summary(self._summary("running"))
            block.to("cpu")
            self._checkpoint(label, i, block)
            zeros, total = zeros + block_zeros, total + block_total
            done = BlockFinished(label=label, block=i, total=n_blocks, initial_loss=initial,
                                 final_loss=final if trains else None, seconds=time.perf_counter() - t_block,
                                 sparsity=block_zeros / block_total, layers=layers)
            if trains:
                self.blocks.append({"label": label, "index": i, "initial_loss": initial, "final_loss": final,
                                    "seconds": done.seconds, "sparsity": done.sparsity})
                self.record.write_summary(self._summary("running"))  # the block's row survives a crash
            yield self.emit(done)
        self.sparsity[label] = zeros / total
        self.masks[label] = digest.hexdigest()[:16]
        dead_total, dead_layers = _dead_totals(self.dead_weights.get(label))
        if dead_total:
            yield self.emit(Notice("warning", f"{label}: {dead_total:,} weights in {dead_layers} layers were zeroed "
                                              "because their input channel never fires (dead channels, as the "
                                              f"reference SparseGPT does); measured sparsity {zeros / total:.1%} vs "
                                              f"{cfg.prune.sparsity:.1%} asked"))
        self.params[label] = sum(t.numel() for t in self.model.parameters())
        if structured:
            self.structure[label] = [st.counts(b) for b in adapter.blocks]
        yield self.emit(self._phase_done(phase, label, t_phase))

    def _restore(self, label: str, start: int, call, hidden: torch.Tensor | None):
        """Put back the first ``start`` blocks of a resumed variant and recompute their calibration outputs."""
        p, n_blocks = self.precision, self.adapter.num_blocks
        redo = hidden is not None and start < n_blocks
        yield self.emit(Notice("info", f"resuming {label}: blocks 0-{start - 1} restored from the checkpoint" +
                                       ("; recomputing their outputs on the calibration set" if redo else "")))
        for i, block in enumerate(list(self.adapter.blocks)[:start]):
            if self.cancelled():
                raise Cancelled()
            kept = self.checkpoints.load(label, i, block)
            if kept is not None:
                self.kept[i] = kept
            if redo:
                self.stage, self.where = "block", f"block {i} of {label} (restored)"
                block.to(p.device)
                hidden, _ = self._forward(block, call, hidden, keep=True)
                block.to("cpu")
        return hidden

    def _checkpoint(self, label: str, index: int, block: nn.Module) -> None:
        try:
            self.checkpoints.save(label, index, block, structure=self.kept.get(index))
        except OSError as e:
            raise EbftError(f"could not write the checkpoint of block {index} under {self.checkpoints.dir} "
                            f"({e.strerror or e}); free some disk space, then continue the run with "
                            f"python -m ebft_engine run --resume {self.record.dir}") from None

    def _train(self, block, call, hidden, targets, masks, label, index):
        self.stage = "train"
        gen = finetune_block(block, call, hidden, targets, masks, self.config.ebft, self.precision,
                             label=label, index=index, seed=self.config.seed * 100_003 + index,
                             cancelled=self.cancelled)
        result = yield from _emitting(gen, self.emit)
        self.stage = "block"
        return result

    @torch.no_grad()
    def _forward(self, block: nn.Module, call, hidden: torch.Tensor, stats: StatsCollector | None = None,
                 targets: torch.Tensor | None = None, keep: bool = True) -> tuple[torch.Tensor | None, float | None]:
        """Run the block over all calibration inputs; return (outputs if keep, MSE against targets if given)."""
        p = self.precision
        out = torch.empty_like(hidden) if keep else None
        sq, count = 0.0, 0
        # The pruning statistics see the source's calibration sequences only, never the self-generated ones
        # appended after them (calib.self_nsamples): batches do not straddle the boundary.
        primary = min(self.config.calib.nsamples, hidden.shape[0])
        spans = [(a, min(a + INFER_BATCH, b)) for a0, b in ((0, primary), (primary, hidden.shape[0]))
                 for a in range(a0, b, INFER_BATCH)]
        for start, end in spans:
            if self.cancelled():
                raise Cancelled()
            x = hidden[start:end].to(p.device)
            if stats is not None:
                stats.enabled = start < primary
            with p.autocast():
                y = call(block, x)
            # the output as it is stored and propagated: float16 storage turns activations past 65504 into inf
            y = y.to(hidden.dtype)
            check_finite(y, p, f"the calibration output of {self.where}")
            if stats is not None and start < primary:
                stats.count(x.shape[0])
            if targets is not None:
                t = targets[start:end].to(p.device)
                sq += torch.sum((y.float() - t.float()) ** 2).item()
                count += t.numel()
            if keep:
                out[start:end] = y.to(out.dtype).to(out.device)
        if stats is not None:
            stats.enabled = True
        return out, (sq / count if count else None)

    def _lora(self, method: str) -> Iterator[Event]:
        """LoRA recovery from ``method``'s masks: prune (checkpointed like any variant), train adapters on the
        calibration tokens, evaluate with the adapters beside the sparse weights (lora), then merged and
        re-masked (lora-merged)."""
        cfg = self.config.lora
        yield from self._block_loop("lora", method, False)
        budget = self.seconds.get("ebft:ebft") if cfg.budget == "ebft" else None
        if cfg.budget == "ebft" and budget is None:
            yield self.emit(Notice("warning", "lora.budget is ebft but EBFT did not run first in this run: LoRA "
                                              f"trains for {cfg.epochs} epochs instead"))
        self.stage, self.where = "lora", "the LoRA training"
        yield self.emit(PhaseStarted("lora", "lora"))
        t = time.perf_counter()
        with lora_adapters(self.model, cfg, structured=self.config.prune.structured) as peft_model:
            gen = train_lora(peft_model, self.calib_ids, cfg, self.precision, seed=self.config.seed,
                             budget_seconds=budget, cancelled=self.cancelled)
            result = yield from _emitting(gen, self.emit)
            self.lora_info = {"steps": result.steps, "epochs": round(result.epochs, 2),
                              "seconds": round(result.seconds, 1), "adapter_params": result.adapter_params,
                              "targets": cfg.target_modules(self.config.prune.structured), "rank": cfg.rank,
                              "alpha": cfg.alpha,
                              "budget": "ebft's time" if budget else f"{cfg.epochs} epochs",
                              "first_loss": result.first_loss, "last_loss": result.last_loss}
            yield self.emit(Notice("info", f"LoRA: {result.steps} steps ({result.epochs:.2f} epochs) in "
                                           f"{result.seconds:.0f} s, {result.adapter_params:,} adapter parameters, "
                                           f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}"
                                   if result.steps else "LoRA: no training step fitted in the budget"))
            yield self.emit(self._phase_done("lora", "lora", t))
            if "lora" not in self.ppl:
                yield from self._evaluate("lora")
            merge_and_remask(peft_model, remask=not self.config.prune.structured)
        counted = [_count_zeros(self.adapter.linears(b), self.dense_numel[i])
                   for i, b in enumerate(self.adapter.blocks)]
        zeros, total = sum(z for z, _ in counted), sum(n for _, n in counted)
        self.sparsity["lora-merged"] = zeros / total
        self.params["lora-merged"] = sum(t.numel() for t in self.model.parameters())
        if "lora-merged" not in self.ppl:
            yield from self._evaluate("lora-merged")

    def _embed_calibration(self) -> torch.Tensor:
        p = self.precision
        with torch.no_grad():
            hidden = self.adapter.embed(self.calib_ids).to(p.storage)
        if p.device.type == "cuda":
            # the planner chose: on the device when the EBFT phase fits there with them, else pinned host memory
            hidden = hidden.to(p.device) if self.plan.activations == "device" else hidden.pin_memory()
        return hidden

    def _owl_profile(self, call) -> Iterator[Event]:
        """OWL (REFERENCE.md §5): each block's outlier ratio of Wanda scores over all its projections, from a
        dense pass, mapped to per-block sparsities spread ±λ around the target with the same mean."""
        cfg, p = self.config.prune, self.precision
        hidden = self._embed_calibration()
        lods = []
        for i, block in enumerate(self.adapter.blocks):
            if self.cancelled():
                raise Cancelled()
            self.stage, self.where = "block", f"block {i} of OWL's dense pass"
            block.to(p.device)
            stats = StatsCollector(frozenset({"input_norms"}))
            linears = self.adapter.linears(block)
            with stats.attach(linears):
                hidden, _ = self._forward(block, call, hidden, stats=stats, keep=True)
            block.to("cpu")
            scores = torch.cat([wanda_scores(l.weight.data, stats.layer_stats(name).input_norms).flatten()
                                for name, l in linears.items()])
            lods.append(100.0 * float((scores > cfg.owl_m * scores.mean()).sum()) / scores.numel())
        yield self.emit(Notice("info", "OWL outlier ratios (%): " + ", ".join(f"{x:.2f}" for x in lods)))
        raw = owl_spread(lods, cfg.sparsity, cfg.owl_lambda)
        lo, hi = min(OWL_BOUNDS[0], cfg.sparsity), max(OWL_BOUNDS[1], cfg.sparsity)
        clamped = [i for i, x in enumerate(raw) if not lo <= x <= hi]
        if clamped:
            yield self.emit(Notice("warning", f"OWL: λ={cfg.owl_lambda:g} spreads the sparsity of block(s) "
                                   f"{', '.join(map(str, clamped))} beyond [{lo:g}, {hi:g}] "
                                   f"({', '.join(f'{raw[i]:.3f}' for i in clamped)}): clamped, and the other blocks "
                                   f"take the difference so that the mean stays {cfg.sparsity:g}"))
        return owl_sparsities(lods, cfg.sparsity, cfg.owl_lambda)

    def _taylor(self, pruned: list[int]) -> Iterator[Event]:
        """LLM-Pruner's Taylor importance of every group in the blocks to prune, from the dense model."""
        cfg, p = self.config.prune, self.precision
        self.stage, self.where = "importance", "the importance pass of structured pruning"
        t = time.perf_counter()
        ids = self.calib_ids[:cfg.taylor_samples, :cfg.taylor_seqlen]
        try:
            scores = st.taylor_importance(self.model, self.adapter.blocks, pruned, ids, p)
        except FloatingPointError:
            raise non_finite(p, "the dense model's loss in the importance pass of structured pruning") from None
        yield self.emit(Notice("info", f"structured pruning: Taylor importance of heads and channels in blocks "
                                       f"{pruned[0]}-{pruned[-1]} from {ids.shape[0]} x {ids.shape[1]} calibration "
                                       f"tokens in {time.perf_counter() - t:.1f} s"))
        return scores

    def _shrink(self, block: nn.Module, index: int, scores, ratio: float) -> dict:
        """Structured pruning of one block: remove its least important heads and channels (no masks to hold:
        the matrices are smaller)."""
        if ratio > 0:
            kept = st.choose(block, scores[index], ratio)
            st.shrink(block, kept)
            self.kept[index] = kept.to_dict()
        return {}

    def _prune(self, block: nn.Module, method, stats: StatsCollector,
               sparsity: float) -> dict[nn.Parameter, torch.Tensor]:
        cfg = self.config.prune
        masks = {}
        for name, linear in self.adapter.linears(block).items():
            result = method.fn(linear.weight.data, stats.layer_stats(name), sparsity, cfg.nm, layer=name, cfg=cfg)
            with torch.no_grad():
                if result.weight is not None:
                    linear.weight.copy_(result.weight)
                linear.weight.mul_(result.mask.to(linear.weight.device))
            masks[linear.weight] = result.mask.to(self.precision.device)
            if result.dead_inputs is not None:
                self.dead_kept[name] = masks[linear.weight] & result.dead_inputs.to(self.precision.device)
        return masks

    # ---- export, summary --------------------------------------------------------------------------------
    def _save(self) -> None:
        path = self.config.save_model
        try:
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            counts = [st.counts(b) for b in self.adapter.blocks]
            # its config states the dense sizes: record each block's own when any is smaller (pruned here, or
            # loaded so)
            if self.config.prune.structured or any(c != st.config_counts(self.model.config) for c in counts):
                save_structure(path, counts)
        except OSError as e:
            raise EbftError(f"save_model: cannot write {path!r} ({e.strerror}); choose a writable folder") from None

    def finish(self, status: str) -> dict[str, Any]:
        """The summary (written to summary.json and --json-out); safe to call at any point of the run."""
        if self.finished_summary is not None:
            return self.finished_summary
        summary = self._summary(status)
        self.record.write_summary(summary)
        if status == "finished":
            self.checkpoints.clear()  # nothing left to resume: give the disk back
        if self.config.json_out:
            try:
                write_json_atomic(Path(self.config.json_out), summary)
            except OSError as e:
                log.error("could not write --json-out %s: %s", self.config.json_out, e)
        self.finished_summary = summary
        return summary

    def _summary(self, status: str) -> dict[str, Any]:
        p = self.precision
        self.seconds["total"] = self.elapsed_before + time.perf_counter() - self.started
        return {
            "run_id": self.record.dir.name, "status": status, "model": self.config.model,
            "ppl": dict(self.ppl), "actual_sparsity": dict(self.sparsity),
            "mask_sha256": dict(self.masks), "sparsity_profile": dict(self.profiles), "blocks": list(self.blocks),
            "lora": dict(self.lora_info), "zeroshot": dict(self.zeroshot),
            "params": dict(self.params), "structure": dict(self.structure),
            "dead_channel_weights": {
                label: dict(zip(("weights", "layers"), _dead_totals(blocks)), blocks=dict(blocks))
                for label, blocks in self.dead_weights.items() if blocks},
            "eval": dict(self.eval_info), "calibration": dict(self.calib_info), "seconds": dict(self.seconds),
            "precision": None if p is None else {"device": str(p.device), "storage": _name(p.storage),
                                                 "compute": _name(p.compute)},
            "memory_plan": None if self.plan is None else {
                "activations": self.plan.activations,
                "phases": {ph.phase: {"device_gib": round(ph.device / GiB, 3), "host_gib": round(ph.host / GiB, 3)}
                           for ph in self.plan.phases}},
            "config": self.config.to_dict(), "pid": os.getpid(), "error": self.error,
        }


OWL_BOUNDS = (0.01, 0.99)  # the reference clamps a per-block sparsity <= 0 to 0.01; at most 0.99 keeps some weights


def owl_spread(lods: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-block sparsities before any bound (REFERENCE.md §5): density D = r - mean(r) + (1 - S), r the
    outlier ratios scaled to [0, 2λ]; more outliers keep more weights; the mean is S. A wide spread leaves
    (0, 1): see owl_sparsities."""
    lo, hi = min(lods), max(lods)
    r = [0.0 if hi == lo else (x - lo) / (hi - lo) * 2 * lam for x in lods]
    mean = sum(r) / len(r)
    return [1 - (x - mean + 1 - sparsity) for x in r]


def owl_sparsities(lods: list[float], sparsity: float, lam: float,
                   bounds: tuple[float, float] = OWL_BOUNDS) -> list[float]:
    """Per-block sparsities from outlier ratios: OWL's spread (owl_spread), held within ``bounds`` while their
    mean stays exactly ``sparsity``: a block that would leave the bounds is clamped and what it cannot take
    goes to the blocks that can, equally (the profile closest to OWL's with that mean, clamp(s + c) for one
    shift c). Blocks keep their order: more outliers, lower sparsity. The bounds widen to hold the target
    itself (sparsity 0 gives 0 everywhere), so the mean is always met."""
    raw = owl_spread(lods, sparsity, lam)
    lo, hi = min(bounds[0], sparsity), max(bounds[1], sparsity)
    want = sparsity * len(raw)

    def total(c: float) -> float:
        return sum(min(max(s + c, lo), hi) for s in raw)

    # total(c) rises piecewise linearly in c, bending where a block meets a bound: find the piece holding the
    # target, then the shift on it exactly (the blocks strictly inside the bounds move with c, the rest stay).
    points = sorted({b - s for s in raw for b in (lo, hi)})
    below = [c for c in points if total(c) <= want]
    a = below[-1] if below else points[0]
    above = [c for c in points if c > a]
    probe = (a + above[0]) / 2 if above else a + 1.0
    free = [s for s in raw if lo < s + probe < hi]
    fixed = sum(min(max(s + probe, lo), hi) for s in raw if not lo < s + probe < hi)
    c = (want - fixed - sum(free)) / len(free) if free else a
    return [min(max(s + c, lo), hi) for s in raw]


def _emitting(gen, emit):
    """``yield from`` a sub-generator, passing each event through ``emit`` (the run record); return its value."""
    try:
        while True:
            yield emit(next(gen))
    except StopIteration as stop:
        return stop.value


def _dead_totals(blocks: dict[str, dict[str, int]] | None) -> tuple[int, int]:
    """(weights, layers) of one variant's dead-channel counts (block -> layer -> weights)."""
    layers = [n for per_layer in (blocks or {}).values() for n in per_layer.values()]
    return sum(layers), len(layers)


def _count_zeros(linears: dict[str, nn.Linear], dense_numel: dict[str, int]) -> tuple[int, int]:
    """(weights removed, weights of the dense layers): zeros, and for a structurally pruned layer also the rows
    and columns it no longer has. ``dense_numel`` maps a layer's short name (the part after the last dot) to its
    dense size."""
    total = sum(dense_numel[name.rsplit(".", 1)[-1]] for name in linears)
    kept = sum(int(torch.count_nonzero(l.weight)) for l in linears.values())
    return total - kept, total


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _name(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).replace("torch.", "")
