"""Zero-shot accuracy with lm-eval, called in-process on the model in memory
(docs/evaluation.md#zero-shot-accuracy).

The paper's tasks are boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge and openbookqa, scored by
acc and acc_norm. lm-eval reads each task's data set through ``datasets``: offline it uses the local cache,
and :func:`check_tasks` says, before the run starts, exactly which tasks have no local copy.

Where the model is while lm-eval scores it is :func:`placed`'s business: the whole model on the device, or,
when that and lm-eval's batch would not fit (``planner.zeroshot_placement`` decides, from the planner's own
arithmetic), everything but the blocks on the device and the blocks' weights streamed from host memory.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError, DataError

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm")
BATCH = 8  # requests per lm-eval batch (HFLM's batch_size)
# The longest request (context + continuation, in tokens) the memory plan provides for. lm-eval sorts a task's
# requests longest first, so its first batch is its largest: a task whose requests run longer needs more than
# planned, and finds out in its first batch rather than hours in.
PLANNED_TOKENS = 1024


def _task_manager(include: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError("eval.zeroshot: lm-eval is not installed; pip install lm-eval") from None
    return TaskManager(include_path=include) if include else TaskManager()


@functools.lru_cache(maxsize=1)
def _builtin_task_names() -> frozenset[str]:
    """lm-eval's own task names (indexing its task YAMLs takes seconds: once per process)."""
    return frozenset(_task_manager(None).all_tasks)


def check_task_names(tasks: tuple[str, ...], include: str | None, manager=None) -> None:
    """Raise ConfigError for a name lm-eval (with ``include``'s task YAMLs) does not know. Reads lm-eval's task
    index only: no data set is loaded, nothing is downloaded (the plan command's check)."""
    known = set(manager.all_tasks) if manager else _builtin_task_names() if not include else set(
        _task_manager(include).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError("eval.zeroshot", f"unknown lm-eval task {unknown[0]!r}",
                          f"use lm-eval task names such as {', '.join(PAPER_TASKS)}, or add your task's YAML "
                          "folder with eval.zeroshot_include")


def check_tasks(tasks: tuple[str, ...], include: str | None) -> None:
    """Load every task's data now; raise ConfigError for an unknown task and DataError naming the tasks whose
    data sets are neither cached nor reachable."""
    manager = _task_manager(include)
    check_task_names(tasks, include, manager)
    missing = []
    for task in tasks:
        try:
            with _quiet():
                manager.load([task])
        except Exception as e:  # ConnectionError offline, FileNotFoundError for a local path, ...
            missing.append(f"{task} ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})")
    if missing:
        raise DataError("eval.zeroshot: no local copy of " + "; ".join(missing) + ". Run once with internet to "
                        "cache them (the Hugging Face datasets cache), or drop those tasks")


def harness(model, tokenizer, batch_size: int = BATCH):
    """lm-eval's HFLM around ``model`` where it is now: HFLM takes a model object's device from its first
    parameter (the embeddings, on the device in either of :func:`placed`'s modes) and moves nothing."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate(model, tokenizer, tasks: tuple[str, ...], *, include: str | None = None,
             limit: int | None = None, batch_size: int = BATCH) -> dict[str, dict[str, Any]]:
    """{task: {"acc": x, "acc_norm": y, "examples": n}} for the model as it is now, where it is now (no copy is
    made; place it with :func:`placed`). Scored without a KV cache (:func:`without_kv_cache`)."""
    import lm_eval

    with _quiet(), without_kv_cache(model):
        lm = harness(model, tokenizer, batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=_task_manager(include),
                                      limit=limit, log_samples=False, bootstrap_iters=0, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    results = {}
    for task in tasks:
        r = out["results"].get(task, {})
        results[task] = {m: r.get(f"{m},none") for m in METRICS if f"{m},none" in r}
        results[task]["examples"] = (out.get("n-samples") or {}).get(task, {}).get("effective")
    return results


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache`` off for the duration: lm-eval scores each batch in one forward pass, and the key/value
    cache transformers would build for it (batch x tokens x blocks x 2 x kv width) is never read."""
    config = model.config
    before = getattr(config, "use_cache", None)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = before


@contextlib.contextmanager
def placed(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str, *, offload: bool) -> Iterator[None]:
    """``model`` on ``device`` for the duration, then back on the device it came from (the run keeps it in host
    memory), also when scoring fails.

    Args:
        model: the whole model; all of its weights on one device (the host, between phases).
        blocks: its decoder blocks (``adapter.blocks``), the ModuleList inside ``model``.
        device: where lm-eval runs.
        offload: False moves the whole model (``Module.to``). True moves everything outside ``blocks``
            (embeddings, final norm, head) and leaves the blocks' weights in host memory: accelerate's
            ``cpu_offload`` hooks copy each layer's weights to ``device`` just before it runs and drop them after,
            so at most one block's weights are on the device at a time, at the price of copying every block's
            weights for each batch. Afterwards the hooks are gone and each block holds its own parameter objects
            again (the same tensors, where they were).
    """
    home = next(model.parameters()).device
    if not offload:
        model.to(device)
        try:
            yield
        finally:
            model.to(home)
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    inside = {id(m) for m in blocks.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    params = [(m, name, p) for m in blocks.modules() for name, p in m.named_parameters(recurse=False)]
    own_forward = {id(m) for m in blocks.modules() if "forward" in vars(m)}
    _move(outside, device)
    try:
        for block in blocks:
            cpu_offload(block, execution_device=torch.device(device))
        yield
    finally:
        for block in blocks:
            remove_hook_from_module(block, recurse=True)
        for m, name, p in params:  # the hooks hand back new parameter objects over the same tensors
            setattr(m, name, p)
        for m in blocks.modules():  # and leave the old forward as an instance attribute
            if id(m) not in own_forward:
                vars(m).pop("forward", None)
        _move(outside, home)


def _move(modules: list[nn.Module], device: torch.device | str) -> None:
    """Each module's own parameters and buffers (not its children's) to ``device``, in place as ``Module.to``
    does: the same parameter objects, their data moved."""
    for m in modules:
        for p in m.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            setattr(m, name, b.to(device))


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets log a great deal: keep it out of the run's output."""
    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval", "datasets")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
