"""Zero-shot accuracy with lm-eval, called in-process on the model in memory
(docs/evaluation.md#zero-shot-accuracy).

The paper's tasks are boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge and openbookqa, scored by
acc and acc_norm. lm-eval reads each task's data set through ``datasets``: offline it uses the local cache,
and :func:`check_tasks` says, before the run starts, exactly which tasks have no local copy.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

from .errors import ConfigError, DataError

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm")


def _task_manager(include: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError("eval.zeroshot: lm-eval is not installed; pip install lm-eval") from None
    return TaskManager(include_path=include) if include else TaskManager()


def check_tasks(tasks: tuple[str, ...], include: str | None) -> None:
    """Load every task's data now; raise ConfigError for an unknown task and DataError naming the tasks whose
    data sets are neither cached nor reachable."""
    manager = _task_manager(include)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError("eval.zeroshot", f"unknown lm-eval task {unknown[0]!r}",
                          f"use lm-eval task names such as {', '.join(PAPER_TASKS)}, or add your task's YAML "
                          "folder with eval.zeroshot_include")
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


def evaluate(model, tokenizer, tasks: tuple[str, ...], device: str, *, include: str | None = None,
             limit: int | None = None, batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """{task: {"acc": x, "acc_norm": y, "examples": n}} for the model as it is now (no copy is made)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
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
