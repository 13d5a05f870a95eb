"""A grid of runs: pruning methods × sparsities × recoveries, one table out (CSV and Markdown), like the paper's.

Each (sparsity, method) cell is one run of the engine with that method as its baseline and the chosen
recoveries from its masks; the model stays loaded between runs (the engine keeps it in-process and restores
the dense weights). Every run keeps its own folder; the table names them.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import registry
from .config import RunConfig, parse_pattern
from .errors import ConfigError
from .events import Event, RunFinished
from .pipeline import preflight, run
from .summary import RunSummary


@dataclass(frozen=True)
class Cell:
    setting: str  # "0.5" or "2:4"
    method: str

    def overrides(self) -> dict[str, Any]:
        if ":" in self.setting:
            return {"prune.pattern": self.setting, "prune.sparsity": None, "prune.method": self.method,
                    "baselines": [self.method]}
        return {"prune.pattern": "unstructured", "prune.sparsity": float(self.setting), "prune.method": self.method,
                "baselines": [self.method]}


def cells(methods: list[str], settings: list[str]) -> list[Cell]:
    """Validate the grid's axes with the engine's own rules; raise ConfigError naming the bad value."""
    out = []
    for setting in settings:
        if ":" in setting:
            parse_pattern(setting)
        else:
            try:
                value = float(setting)
            except ValueError:
                raise ConfigError("grid.sparsities", f"{setting!r} is neither a fraction nor N:M",
                                  "write e.g. 0.5,0.7,2:4") from None
            if not 0 <= value < 1:
                raise ConfigError("grid.sparsities", f"{setting} is outside [0, 1)", "write e.g. 0.5,0.7,2:4")
        for method in methods:
            out.append(Cell(setting, method))
    return out


def run_grid(base: RunConfig, methods: list[str], settings: list[str],
             cancel: Callable[[], bool] | None = None) -> Iterator[tuple[Cell, Event]]:
    """Yield (cell, event) for every event of every run; each cell's last event is its RunFinished."""
    grid = cells(methods, settings)
    configs = [(cell, base.with_overrides(cell.overrides())) for cell in grid]  # all refused before any runs
    for _cell, config in configs:  # and checked against the model's config (e.g. 4:8 on a width of 60)
        preflight(config)
    for cell, config in configs:
        for event in run(config, cancel):
            yield cell, event
        if isinstance(event, RunFinished) and event.status == "cancelled":
            return


def table(results: dict[Cell, RunSummary | dict[str, Any]],
          recoveries: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: one row per (setting, method), pruned and each recovery's perplexity in columns.

    Args:
        results: each cell's summary (RunFinished.summary, or a RunSummary).
    """
    labels = ["pruned"] + [label for r in recoveries for label in (registry.recovery_entry(r).labels or (r,))]
    header = ["sparsity", "method", "dense"] + labels + ["run"]
    rows = []
    for cell, summary in results.items():
        if not isinstance(summary, RunSummary):
            summary = RunSummary.from_dict(summary)
        ppl = summary.ppl
        row = [cell.setting, cell.method, ppl.get("dense"), ppl.get(cell.method)]
        row += [ppl.get(label) for label in labels[1:]]
        rows.append(row + [summary.run_id])
    return header, rows


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[("" if v is None else f"{v:.4f}" if isinstance(v, float) else v) for v in row] for row in rows])
    return buf.getvalue()


def to_markdown(header: list[str], rows: list[list[Any]], protocol: str = "") -> str:
    """The table in Markdown; ``protocol``: the evaluation protocol in words (RunSummary.protocol), under it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 3) + "---|"]
    for row in rows:
        lines.append("| " + " | ".join("-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    if protocol:
        lines += ["", f"protocol: {protocol}"]
    return "\n".join(lines) + "\n"


def write(out: str | Path, header: list[str], rows: list[list[Any]], protocol: str = "") -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    csv_path.write_text(to_csv(header, rows), encoding="utf-8")
    md_path.write_text(to_markdown(header, rows, protocol), encoding="utf-8")
    return csv_path, md_path
