"""Tables as pandas DataFrames, pure functions of RunViews and run folders."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ebft_engine import read_events
from ebft_engine.record import load_summary, run_folders, status_of
from ebft_engine.summary import RunSummary
from ebft_engine.summary import protocol as protocol_of

from .state import RunView, fold

PPL_COLUMNS = ["model", "perplexity", "vs dense", "sparsity"]


def protocol(view: RunView) -> str:
    """The evaluation protocol in words (EvalInfo.protocol): source, seqlen, windows, partial or full, tokens."""
    return protocol_of(view.eval_info)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 10 ** 7 else f"{n / 1e6:.3f}M"


def ppl_table(view: RunView) -> pd.DataFrame:
    """One row per evaluated model: perplexity, ratio to dense, measured sparsity (and size); then one column per
    zero-shot task: acc (acc_norm)."""
    dense = view.ppl.get("dense")
    summary = view.summary or RunSummary()  # empty while the run goes on
    rows = [[label, round(ppl, 3), "" if dense is None or label == "dense" else f"{ppl / dense:.2f}×",
             _sparsity_text(view, summary, label)] for label, ppl in view.ppl.items()]
    table = pd.DataFrame(rows, columns=PPL_COLUMNS)
    for task in dict.fromkeys(t for results in view.zeroshot.values() for t in results):
        table[f"{task} acc (norm)"] = [_zeroshot_cell(view.zeroshot.get(label, {}).get(task))
                                       for label in table["model"]]
    return table


def _sparsity_text(view: RunView, summary: RunSummary, label: str) -> str:
    """The sparsity cell: measured (the summary's, else the mean of the blocks' layers so far), LoRA's adapter
    weights, and the parameter count when structured pruning made the model itself smaller."""
    s = summary.actual_sparsity.get(label)
    if s is None and label in view.sparsity:
        per = [v for layers in view.sparsity[label].values() for v in layers.values()]
        s = sum(per) / len(per) if per else None
    text = "" if s is None else f"{s:.2%}"
    adapters = summary.lora.adapter_params if summary.lora else None
    if label == "lora" and adapters:
        text += f" + {adapters / 1e6:.2f}M adapter weights"
    params = summary.params.get(label)
    if summary.structured and params:
        text = (text + ", " if text else "") + f"{_millions(params)} parameters"
    return text


def _zeroshot_cell(result: dict | None) -> str:
    if result is None:
        return ""
    return f"{result.get('acc', float('nan')):.3f} ({result.get('acc_norm', float('nan')):.3f})"


RESUMABLE = ("interrupted", "cancelled", "failed")  # statuses the History tab offers to resume


def list_runs(runs_dir: str | Path) -> pd.DataFrame:
    """Past runs, newest first (by start time: :func:`ebft_engine.record.run_folders`): id, status, model,
    method, sparsity, and the perplexities they measured."""
    rows = []
    for folder in run_folders(runs_dir):
        config, summary = _read_json(folder / "config.json"), load_summary(folder)
        if config is None:
            continue
        prune = config.get("prune", {})
        status = status_of(summary)
        ppl = summary.ppl if summary else {}
        rows.append([folder.name, status, config.get("model"), prune.get("method"), prune.get("pattern"),
                     prune.get("sparsity"), _fmt(ppl.get("dense")), _fmt(ppl.get("ebft")),
                     ", ".join(f"{k} {v:.2f}" for k, v in ppl.items() if k not in ("dense", "ebft"))])
    return pd.DataFrame(rows, columns=["run", "status", "model", "method", "pattern", "sparsity", "dense", "ebft",
                                       "baselines"])


def load_view(run_dir: str | Path) -> RunView:
    return fold(read_events(run_dir))


def compare_table(views: dict[str, RunView]) -> pd.DataFrame:
    labels = list(dict.fromkeys(label for view in views.values() for label in view.ppl))
    rows = []
    for name, view in views.items():
        prune = view.config.get("prune", {})
        rows.append([name, prune.get("method"), prune.get("pattern"), prune.get("sparsity")]
                    + [_fmt(view.ppl.get(label)) for label in labels] + [protocol(view)])
    return pd.DataFrame(rows, columns=["run", "method", "pattern", "sparsity"] + labels + ["protocol"])


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"
