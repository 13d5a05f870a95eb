"""``python -m ebft_engine run ...``: the command line. The only argparse in the engine.

Flags override a YAML preset given with ``--config``; the run prints its events as it goes and ends with the
perplexity table. Exit status: 0 finished, 1 failed, 2 bad input (also a run that stopped on a configuration
the model cannot run in: a ConfigError mid-run, e.g. --dtype float16 whose activations overflow), 130 cancelled
(Ctrl-C), 141 when whatever read the output closed it first (``| head``: quietly, as a shell's SIGPIPE would end
it; a run stops there and can be resumed).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any, Sequence, TextIO

from . import registry
from .config import DEVICES, DTYPES, RunConfig
from .errors import EbftError
from .events import (BlockFinished, BlockStarted, EvalFinished, Notice, PhaseFinished, PhaseStarted, RunFinished,
                     RunStarted, StepLoss, ZeroShotFinished)
from .pipeline import OUTPUT_OVERRIDES, RESUME_OVERRIDES, resume, run
from .summary import RunSummary

# flag -> dotted config field
FLAGS: dict[str, tuple[str, type, str]] = {
    "--model": ("model", str, "hub id, local folder, .gguf file, smollm2-135m (the embedded default), or tiny-random "
                         "(a random 4-block LLaMA, for trying the tool)"),
    "--method": ("prune.method", str, "initial pruning method: " + ", ".join(
        [e.name for e in registry.pruning_entries() if e.kind != "allocation"] +
        [f"{e.name}-<method>" for e in registry.pruning_entries("allocation")])),
    "--sparsity": ("prune.sparsity", float, "fraction of weights removed per linear layer, in [0, 1); with "
                                            "llm-pruner, of all blocks' weights"),
    "--pattern": ("prune.pattern", str, "unstructured, N:M such as 2:4 or 4:8 (N kept of every M), or structured "
                                        "(llm-pruner: whole heads and MLP channels, smaller matrices)"),
    "--calib": ("calib.source", str, "calibration data: c4, wikitext2, self or file:PATH"),
    "--nsamples": ("calib.nsamples", int, "number of calibration sequences"),
    "--seqlen": ("calib.seqlen", int, "tokens per calibration sequence"),
    "--self-nsamples": ("calib.self_nsamples", int, "append N sequences the dense model writes itself, for the "
                                                    "reconstruction only (Shin et al.; pruning statistics use "
                                                    "--calib's alone)"),
    "--epochs": ("ebft.epochs", int, "EBFT epochs per block (0 skips EBFT)"),
    "--lr": ("ebft.lr", float, "EBFT learning rate"),
    "--batch-size": ("ebft.batch_size", int, "EBFT batch size (sequences)"),
    "--weight-decay": ("ebft.weight_decay", float, "AdamW weight decay"),
    "--lora-rank": ("lora.rank", int, "LoRA rank"),
    "--lora-alpha": ("lora.alpha", float, "LoRA scale alpha"),
    "--lora-targets": ("lora.targets", str, "auto (q_proj,v_proj) or comma-separated projections for adapters"),
    "--lora-lr": ("lora.lr", float, "LoRA learning rate"),
    "--lora-epochs": ("lora.epochs", int, "LoRA epochs, when --lora-budget epochs"),
    "--lora-budget": ("lora.budget", str, "ebft: train for EBFT's wall-clock time in this run (fair); or epochs"),
    "--eval": ("eval.source", str, "evaluation data: wikitext2, c4, ptb or file:PATH"),
    "--eval-seqlen": ("eval.seqlen", int, "tokens per evaluation window (default: context, at most 2048)"),
    "--eval-windows": ("eval.windows", int, "evaluate the first N windows only (reported as partial)"),
    "--zeroshot": ("eval.zeroshot", str, "lm-eval tasks scored on every model, e.g. boolq,rte,hellaswag,winogrande,"
                                         "arc_easy,arc_challenge,openbookqa"),
    "--zeroshot-limit": ("eval.zeroshot_limit", int, "at most N examples per zero-shot task (partial)"),
    "--zeroshot-include": ("eval.zeroshot_include", str, "a folder of extra lm-eval task YAMLs"),
    "--baselines": ("baselines", str, "comma-separated pruned-only baselines, any --method value"),
    "--recoveries": ("recoveries", str, "comma-separated recoveries from --method's masks: " + "; ".join(
        f"{e.name} ({e.description})" for e in registry.recovery_entries())),
    "--device": ("device", str, f"{', '.join(DEVICES)} or cuda:N"),
    "--dtype": ("dtype", str, f"weights dtype: {', '.join(DTYPES)}"),
    "--activations": ("activations", str, "where calibration activations live on a GPU: auto (the memory planner "
                                          "decides), device, or host (pinned)"),
    "--seed": ("seed", int, "random seed"),
    "--runs-dir": ("runs_dir", str, "where run folders are written (default runs/)"),
    "--json-out": ("json_out", str, "also write the summary JSON here"),
    "--save-model": ("save_model", str, "save the run's last model as safetensors in this folder"),
}

# every registered method's options: --dsnot-init, --owl-lambda, --keep-first, ... (registry.option)
FLAGS.update({"--" + name.replace("_", "-"): (f"prune.{name}", f.type, f.metadata["help"])
              for name, (_entry, f) in registry.option_fields().items()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ebft_engine",
                                     description="Prune a causal LM and recover it with EBFT, block by block.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="prune, fine-tune and compare perplexities",
                       description="Flags override the preset given with --config.")
    r.add_argument("--config", help="YAML preset, e.g. assets/presets/smollm2-demo.yaml")
    for flag, (_field, _type, help_text) in FLAGS.items():
        r.add_argument(flag, help=help_text)  # parsed as text; the config layer converts and validates
    r.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a killed, cancelled or failed run in its folder, from its last finished block "
                        "(with its own settings: only --batch-size, --activations, --json-out and --quiet)")
    r.add_argument("--quiet", action="store_true", help="no progress: print warnings, errors and the final table only")
    g = sub.add_parser("grid", help="methods x sparsities x recoveries in one command, one table out",
                       description="One run per (sparsity, method), each with the recoveries; writes OUT.csv and "
                                   "OUT.md. Other flags override the preset for every run.")
    g.add_argument("--config", help="YAML preset")
    g.add_argument("--methods", required=True, help="comma-separated pruning methods, e.g. magnitude,wanda,sparsegpt")
    g.add_argument("--sparsities", required=True, help="comma-separated fractions and N:M patterns, e.g. 0.5,0.7,2:4")
    g.add_argument("--out", default="grid", help="table path without extension (default: grid -> grid.csv, grid.md)")
    for flag, (_field, _type, help_text) in FLAGS.items():
        # a grid sets method and sparsity per cell, and one --json-out or --save-model would be overwritten by
        # every run: each run's summary is in its folder, named in the table
        if flag not in ("--method", "--sparsity", "--pattern", "--baselines", "--json-out", "--save-model"):
            g.add_argument(flag, help=help_text)
    pl = sub.add_parser("plan", help="will it fit? the memory plan of a run on a named GPU, from the model's "
                                     "config alone (no weights, no GPU needed)",
                        description="Each phase's device and host peak, the precision and attention kernel the "
                                    "card gets, and a verdict with what to change when it does not fit.")
    pl.add_argument("--config", help="YAML preset, e.g. assets/presets/llama-7b-paper.yaml")
    pl.add_argument("--gpu", help="t4, v100-16, rtx4080-16, a100-40 or h100-80")
    pl.add_argument("--gpu-memory", metavar="GIB", help="any other card's memory in GiB (sm80 or newer "
                                                                   "unless --gpu names its kind)")
    pl.add_argument("--host-memory", metavar="GIB", help="host RAM in GiB, to check the host peaks too")
    for flag, (_field, _type, help_text) in FLAGS.items():
        pl.add_argument(flag, help=help_text)
    return parser


def plan_and_print(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``plan``: 0 when the run fits the card, 1 when it does not, 2 for bad input."""
    from .cards import card_named, plan_text

    try:
        card = card_named(args.gpu, args.gpu_memory)
        text, fits = plan_text(config_from_args(args), card, args.host_memory)
    except EbftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, file=out)
    return 0 if fits else 1


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset (or defaults) with every given flag applied; raises ConfigError naming the flag's field."""
    base = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    overrides: dict[str, Any] = {}
    for flag, (field, _type, _help) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            overrides[field] = value
    return base.with_overrides(overrides) if overrides else base


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "grid":
        return grid_and_print(args, out)
    if args.command == "plan":
        return plan_and_print(args, out)
    if args.resume:
        # how the remaining blocks fit in memory (RESUME_OVERRIDES), and where the summary also goes (--json-out)
        allowed = [flag for flag, (field, _t, _h) in FLAGS.items() if field in RESUME_OVERRIDES + OUTPUT_OVERRIDES]
        given = [flag for flag in ["--config", *FLAGS] if getattr(args, flag[2:].replace("-", "_")) is not None]
        refused = [flag for flag in given if flag not in allowed]
        if refused:
            print(f"error: --resume continues a run with the settings it was started with; drop {', '.join(refused)}"
                  f" (or start a new run with them); only {', '.join(allowed)} and --quiet may be given with it",
                  file=sys.stderr)
            return 2
        overrides = {FLAGS[flag][0]: getattr(args, flag[2:].replace("-", "_")) for flag in given}
        return run_and_print(None, quiet=args.quiet, out=out, resume_dir=args.resume, overrides=overrides)
    try:
        config = config_from_args(args)
    except EbftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_and_print(config, quiet=args.quiet, out=out)


def run_and_print(config: RunConfig | None, quiet: bool = False, out: TextIO = sys.stdout,
                  resume_dir: str | None = None, overrides: dict[str, Any] | None = None) -> int:
    cancel = threading.Event()
    printer = _Printer(out, quiet)
    finished = None
    events = resume(resume_dir, cancel, overrides) if resume_dir else run(config, cancel)
    try:
        first = next(events)  # the engine refuses a bad run folder here, before any event
    except EbftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during the checks before the run: no folder was made, nothing to resume
        print("cancelled before the run started", file=sys.stderr)
        return 130
    try:
        printer.show(first)
        for event in events:
            printer.show(event)
            if isinstance(event, RunFinished):
                finished = event
    except KeyboardInterrupt:
        # Ctrl-C landed outside the engine's own handler: ask it to stop and drain what it still reports.
        cancel.set()
        for event in events:
            printer.show(event)
            if isinstance(event, RunFinished):
                finished = event
    finally:
        printer.close()
    if finished is None:
        return 1
    error = RunSummary.from_dict(finished.summary).error
    if finished.status == "failed" and error is not None and error.field:
        return 2  # it failed on a field's value (a ConfigError): bad input, like a refusal before the run
    return {"finished": 0, "cancelled": 130}.get(finished.status, 1)


def grid_and_print(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from . import grid

    cancel = threading.Event()
    try:
        base = config_from_args(args)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        settings = [x.strip() for x in args.sparsities.split(",") if x.strip()]
        events = grid.run_grid(base, methods, settings, cancel.is_set)
        first = next(events)  # every cell's config is checked before the first run starts
    except EbftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, statuses = _grid_results(_chain(first, events), len(methods) * len(settings), cancel, out)
    if not results:
        return 1
    header, rows = grid.table(results, list(base.recoveries) if base.ebft.epochs > 0 else [])
    protocol = next(iter(results.values())).protocol()
    csv_path, md_path = grid.write(args.out, header, rows, protocol)
    print(grid.to_markdown(header, rows, protocol), file=out)
    print(f"table: {csv_path} {md_path}", file=out)
    if "cancelled" in statuses:
        return 130
    return 0 if all(s == "finished" for s in statuses) else 1


def _grid_results(events, total: int, cancel: threading.Event,
                  out: TextIO) -> tuple[dict[Any, RunSummary], list[str]]:
    """Print a grid's progress; return each finished cell's summary and every run's status (Ctrl-C: cancelled)."""
    results: dict[Any, RunSummary] = {}
    statuses: list[str] = []
    try:
        for cell, event in events:
            if isinstance(event, RunStarted):
                print(f"[{len(statuses) + 1}/{total}] sparsity {cell.setting}, {cell.method} -> {event.run_dir}",
                      file=out, flush=True)
            elif isinstance(event, Notice) and event.level != "info":
                print(f"   [{event.level}] {event.text}", file=out, flush=True)
            elif isinstance(event, EvalFinished):
                print(f"   ppl[{event.label}] = {event.ppl:.3f}", file=out, flush=True)
            elif isinstance(event, RunFinished):
                results[cell] = RunSummary.from_dict(event.summary)
                statuses.append(event.status)
    except KeyboardInterrupt:
        cancel.set()
        statuses.append("cancelled")
    return results, statuses


def _chain(first, rest):
    yield first
    yield from rest


class _Printer:
    """Renders events: one line per phase, a progress bar over blocks, the table at the end."""

    def __init__(self, out: TextIO, quiet: bool):
        self.out, self.quiet, self.bar, self.run_dir = out, quiet, None, None
        self.lost = False  # the output could not be written: the run goes on silently

    def say(self, text: str) -> None:
        if self.lost:
            return
        try:
            if self.bar is not None:
                self.bar.write(text, file=self.out)
            else:
                print(text, file=self.out, flush=True)
        except BrokenPipeError:  # the reader went away (`| head`): the caller stops, as a shell expects
            raise
        except OSError as e:  # the output cannot be written (a full disk): say so once and let the run finish
            self.lost = True
            if self.out is sys.stdout:  # the exit's own flush would fail again on what is buffered
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            where = f"; its results go to {self.run_dir}" if self.run_dir else ""
            print(f"error: the output cannot be written ({e.strerror}); the run goes on without it{where}",
                  file=sys.stderr)

    def show(self, event) -> None:
        """Print ``event`` with the handler of its kind (events the printer does not show have none)."""
        for kind, handler in self._HANDLERS:
            if isinstance(event, kind):
                handler(self, event)
                return

    def _run_started(self, event: RunStarted) -> None:
        self.run_dir = event.run_dir
        if not self.quiet:
            self.say(f"{'resuming run' if event.resumed else 'run'} {event.run_id} -> {event.run_dir}")

    def _notice(self, event: Notice) -> None:
        if not (self.quiet and event.level == "info"):
            self.say(f"[{event.level}] {event.text}")

    def _phase_started(self, event: PhaseStarted) -> None:
        if not self.quiet:
            self.say(f"== {event.phase} {event.label}".rstrip())

    def _block_started(self, event: BlockStarted) -> None:
        if not self.quiet and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, desc=f"{event.label} blocks", file=sys.stderr, leave=False)

    def _step_loss(self, event: StepLoss) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"step {event.step}/{event.total_steps} loss {event.loss:.3g}")

    def _block_finished(self, event: BlockFinished) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if event.initial_loss is not None and not self.quiet:
            self.say(f"   block {event.block:>3}: loss {event.initial_loss:.4g} -> {event.final_loss:.4g} "
                     f"({event.seconds:.1f}s)")

    def _phase_finished(self, event: PhaseFinished) -> None:
        self.close()
        if not self.quiet:
            self.say(f"   {event.phase} {event.label} done in {event.seconds:.1f}s".replace("  ", " "))

    def _eval_finished(self, event: EvalFinished) -> None:
        if not self.quiet:  # the final table has them all
            self.say(f"   ppl[{event.label}] = {event.ppl:.3f}")

    def _zeroshot_finished(self, event: ZeroShotFinished) -> None:
        if not self.quiet:
            self.say(f"   zero-shot[{event.label}]: " + ", ".join(
            f"{task} acc {r.get('acc', float('nan')):.3f}" for task, r in event.results.items()))

    def _run_finished(self, event: RunFinished) -> None:
        self.close()
        self.say(format_table(event.summary))
        self.say(f"status: {event.status}" + (f" (run folder {self.run_dir})" if self.run_dir else ""))

    _HANDLERS = ((RunStarted, _run_started), (Notice, _notice), (PhaseStarted, _phase_started),
                 (BlockStarted, _block_started), (StepLoss, _step_loss), (BlockFinished, _block_finished),
                 (PhaseFinished, _phase_finished), (EvalFinished, _eval_finished),
                 (ZeroShotFinished, _zeroshot_finished), (RunFinished, _run_finished))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_table(summary: RunSummary | dict[str, Any]) -> str:
    """The perplexity comparison as a Markdown table, with the protocol under it."""
    if not isinstance(summary, RunSummary):
        summary = RunSummary.from_dict(summary)
    structured = summary.structured
    lines = ["| model | perplexity | sparsity |" + (" parameters |" if structured else ""),
             "|---|---:|---:|" + ("---:|" if structured else "")]
    for label, ppl in summary.ppl.items():
        s = summary.actual_sparsity.get(label)
        count = _parameters(summary.params.get(label)) if structured else ""
        lines.append(f"| {label} | {ppl:.3f} | {'-' if s is None else f'{s:.2%}'} |" + count)
    lines += _zeroshot_table(summary.zeroshot)
    if summary.eval is not None:
        lines.append(f"\nprotocol: {summary.protocol()}")
    return "\n".join(lines)


def _parameters(n: int | None) -> str:
    """A parameter count as a table cell: millions, three decimals under 10M; "-" when not known."""
    return " - |" if not n else f" {n / 1e6:.1f}M |" if n >= 10 ** 7 else f" {n / 1e6:.3f}M |"


def _zeroshot_table(zeroshot: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The zero-shot accuracies (acc / acc_norm) as Markdown lines, a blank line first; none without results."""
    tasks = list(dict.fromkeys(t for results in zeroshot.values() for t in results))
    if not tasks:
        return []
    lines = ["", "| model | " + " | ".join(f"{t} acc / acc_norm" for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, results in zeroshot.items():
        cells = [results.get(t, {}) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(f"{c.get('acc', float('nan')):.3f} / "
                                                  f"{c.get('acc_norm', float('nan')):.3f}" for c in cells) + " |")
    return lines
