"""The learned-mask comparison on SmolLM2-135M, from measured runs: every recovery (``ebft``, ``ebft-mask``,
``ebft-gp``, ``ebft-mask-gp``, LoRA) from each pruner's masks, perplexity and training seconds side by side.

    python bench/masks_table.py [SUMMARY.json ...] [--untimed SUMMARY.json ...] [--out PATH]

Each argument is a run's ``summary.json``; without any, the runs the README's table is made of
(``TIMED_RUNS`` and ``UNTIMED_RUNS`` below, in ``bench/results/``), so the plain command rewrites
``bench/results/smollm2_masks_table.md`` as committed. Runs are grouped by the masks EBFT started from
(``prune.method``), the setting (sparsity or N:M) and the epochs per block; within a group a label's perplexity
and seconds come from the first file that has it, so list the runs whose timings you trust first. Every group
is checked: the same calibration, evaluation and starting masks (``mask_sha256`` of the pruner) in all its
files, and a label measured twice must agree to 0.01 in perplexity (the runs are seeded); a disagreement is
printed as a warning line, as is a run that did not finish (its measured cells still count). ``--untimed``
files give perplexities only: their seconds are left out of the time table (runs that shared the cores with
other jobs; speed here drifts 2x with load), and a time ratio is shown only for two recoveries timed in the
same run. This script runs nothing: the measurements are the runs'. The last line is ``table: <path>``; a file
that is not a run's summary is one line naming it, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECOVERIES = ["ebft", "ebft-mask", "ebft-gp", "ebft-mask-gp", "lora", "lora-merged"]
# The README's table: quiet runs first (their seconds count), then runs that shared the cores.
TIMED_RUNS = ["smollm2_masks_70pct_ep5_ebft", "smollm2_masks_2of4_ep5_ebft", "smollm2_masks_50pct_ep5_quiet",
              "smollm2_masks_70pct_ep5", "smollm2_masks_sparsegpt_50pct_ep5", "smollm2_masks_sparsegpt_70pct_ep5",
              "smollm2_masks_sparsegpt_2of4_ep5", "smollm2_masks_70pct_gp6", "smollm2_masks_2of4_ep6",
              "smollm2_baselines_70pct", "smollm2_baselines_2of4"]
UNTIMED_RUNS = ["smollm2_masks_2of4_ep5", "smollm2_masks_alps_2of4_ep5", "smollm2_alps_50pct", "smollm2_alps_70pct"]
PHASE_OF = {"ebft": "ebft:ebft", "ebft-mask": "ebft:ebft-mask", "ebft-gp": "ebft:ebft-gp",
         "ebft-mask-gp": "ebft:ebft-mask-gp", "lora": "lora:lora"}


def setting(config: dict) -> str:
    """'50%', '70%' or 'N:M' from a summary's ``config``."""
    prune = config["prune"]
    return prune["pattern"] if prune["pattern"] != "unstructured" else f"{round(100 * prune['sparsity'])}%"


def identity(summary: dict, method: str) -> tuple:
    """What must agree for two runs' cells to share a row: the calibration and evaluation data (the eval file's
    name, not how its path was written) and the pruner's masks."""
    cal, ev = summary["calibration"], summary["eval"]
    return (cal["source"], cal["nsamples"], cal["seqlen"], Path(ev["source"]).name, ev["seqlen"], ev["windows"],
            summary["mask_sha256"].get(method))


class NotASummary(ValueError):
    """A file that is not a run's summary.json: the message names it and what is missing."""


def load(path: Path) -> tuple[tuple, tuple, dict]:
    """A run's summary as (row key: method, setting, epochs; :func:`identity`; the summary), checked for what
    the table reads; raises NotASummary."""
    try:
        s = json.loads(path.read_text())
        cfg = s["config"]
        for value, kind in ((cfg["prune"]["method"], str), (cfg["prune"]["pattern"], str),
                            (cfg["ebft"]["epochs"], int), (s["ppl"], dict), (s["seconds"], dict),
                            (s["mask_sha256"], dict)):
            if not isinstance(value, kind):
                raise TypeError(f"{value!r} is not {kind.__name__}")
        method = cfg["prune"]["method"]
        return (method, setting(cfg), cfg["ebft"]["epochs"]), identity(s, method), s
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise NotASummary(f"summaries: {path} is not a run's summary.json ({what}); pass the summary.json of a "
                          "run (in its run folder, or bench/results/*_summary.json)") from None


def group(files: list[Path], untimed: frozenset[Path] = frozenset()) -> tuple[dict, list[str]]:
    """(method, setting, epochs) -> {"ppl": {label: value}, "seconds": {label: s}, "timed_in": {label: file name},
    "lora_steps": int | None, "files": [names]}; and the consistency warnings."""
    groups: dict[tuple, dict] = {}
    warnings = []
    for path in files:
        key, ident, s = load(path)
        method = key[0]
        if s.get("status", "finished") != "finished":
            warnings.append(f"warning: {path.name} has status {s.get('status')}: the numbers it measured are used")
        g = groups.setdefault(key, {"ppl": {}, "seconds": {}, "timed_in": {}, "lora_steps": None, "files": [],
                                    "ident": ident, "first": path.name})
        if ident != g["ident"]:
            warnings.append(f"warning: {path.name} differs from {g['first']} in calibration, evaluation or "
                            f"{method}'s masks; its cells are left out")
            continue
        used = False
        for label in [method, *RECOVERIES]:
            if label not in s["ppl"]:
                continue
            value = s["ppl"][label]
            if label in g["ppl"]:
                if abs(g["ppl"][label] - value) > 0.01:
                    why = " (LoRA trains for a wall-clock budget: its steps differ)" if label.startswith("lora") else ""
                    warnings.append(f"warning: {label} at {key[1]} from {method}: {value:.2f} in {path.name}, "
                                    f"{g['ppl'][label]:.2f} in an earlier file{why}")
                continue
            g["ppl"][label] = value
            used = True
            if label in PHASE_OF and PHASE_OF[label] in s["seconds"] and path not in untimed:
                g["seconds"][label] = s["seconds"][PHASE_OF[label]]
                g["timed_in"][label] = path.name
            if label == "lora" and s.get("lora") and path not in untimed:
                g["lora_steps"] = s["lora"].get("steps")
        if used:
            g["files"].append(path.name)
    return groups, warnings


def change(a: float | None, b: float | None) -> str:
    return f"{100 * (a / b - 1):+.1f}%" if a is not None and b is not None else ""


def render(groups: dict, warnings: list[str]) -> str:
    order = {"wanda": 0, "sparsegpt": 1, "alps": 2}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 9), k[2], k[1]))
    head = "| masks from | setting | epochs | pruned | " + " | ".join(RECOVERIES) + \
           " | ebft-mask vs ebft | ebft-mask-gp vs ebft-gp |"
    lines = ["Perplexity (WikiText-2 test file, 16 × 1024; blank: not measured):", "", head,
             "|---|---|---:|" + "---:|" * (len(RECOVERIES) + 3)]
    for key in keys:
        ppl = groups[key]["ppl"]
        cells = [f"{ppl[label]:.2f}" if label in ppl else "" for label in [key[0], *RECOVERIES]]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " | "
                     f"{change(ppl.get('ebft-mask'), ppl.get('ebft'))} | "
                     f"{change(ppl.get('ebft-mask-gp'), ppl.get('ebft-gp'))} |")
    timed = list(PHASE_OF)
    lines += ["", "Training seconds per recovery (2 CPU cores; LoRA trains for `ebft`'s time in its run; a ratio only where "
              "both were timed in the same run):", "",
              "| masks from | setting | epochs | " + " | ".join(timed) + " | ebft-mask / ebft | "
              "ebft-mask-gp / ebft-gp |", "|---|---|---:|" + "---:|" * (len(timed) + 2)]
    for key in [k for k in keys if groups[k]["seconds"]]:  # rows with no timed run have no line here
        g = groups[key]
        sec = g["seconds"]
        cells = [f"{sec[label]:.0f}" if label in sec else "" for label in timed]
        if "lora" in sec and g["lora_steps"] is not None:
            cells[timed.index("lora")] += f" ({g['lora_steps']} steps)"
        same_run = g["timed_in"]  # a ratio only within one run: speed here drifts 2x between runs
        ratio = [f"{sec[a] / sec[b]:.2f}×" if a in sec and b in sec and same_run[a] == same_run[b] else ""
                 for a, b in (("ebft-mask", "ebft"), ("ebft-mask-gp", "ebft-gp"))]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " | " + " | ".join(ratio) + " |")
    lines += ["", "Sources, per row (a label's cells come from the first file that has it):", ""]
    lines += [f"- {k[0]} {k[1]}, {k[2]} epochs: " + ", ".join(groups[k]["files"]) for k in keys]
    if warnings:
        lines += ["", *warnings]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="*", type=Path)
    parser.add_argument("--untimed", nargs="+", type=Path, default=[],
                        help="summaries whose perplexities count but whose seconds do not (shared cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "smollm2_masks_table.md")
    args = parser.parse_args(argv)
    results = ROOT / "bench" / "results"
    if args.summaries or args.untimed:
        files, untimed = [*args.summaries, *args.untimed], args.untimed
    else:
        untimed = [results / f"{name}_summary.json" for name in UNTIMED_RUNS]
        files = [*(results / f"{name}_summary.json" for name in TIMED_RUNS), *untimed]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"error: summaries: no such file: {', '.join(missing)}; pass runs' summary.json files",
              file=sys.stderr)
        return 2
    try:
        groups, warnings = group(files, frozenset(untimed))
    except NotASummary as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = render(groups, warnings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
