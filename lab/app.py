"""The Gradio lab: setup panel, live run, results, history and a Learn tab. Layout and wiring only: the work
is the engine's, the figures come from plots.py and tables.py, the rules from policy.py."""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import spaces
import yaml

from ebft_engine import ConfigError, EbftError, RunConfig, resume, run
from ebft_engine.cards import CARDS
from ebft_engine.config import DSNOT_INITS, DSNOT_LAYERS, OWL_PREFIX, PRUNE_METHODS, RECOVERIES, STRUCTURED_METHODS
from ebft_engine.events import BlockFinished, EvalFinished, RunFinished

from . import plots, policy, tables
from .state import RunView, Throttle

ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = ROOT / "assets" / "presets"
TEACHING_DIR = ROOT / "assets" / "teaching"
DEFAULT_PRESET = "smollm2-spaces" if policy.on_spaces() else "smollm2-demo"
GPU = "device"  # every event that touches the model shares this concurrency id: one job at a time
ZERO_GPU_SECONDS = 300  # the longest run the Space's bounds allow (lab/policy.py), with room to spare

HOW_TO_READ = {
    "loss": "Each line is one block's reconstruction loss (mean squared error against the dense block) as EBFT "
            "trains it; the diamond at step 0 is the loss right after pruning. The bright line is the block "
            "training now. Lower is closer to the dense model; the y axis is logarithmic.",
    "bars": "For every block, grey is the loss after pruning and orange after EBFT: the gap is what training "
            "repaired. Late blocks carry larger activations, so their losses are larger.",
    "ppl": "Perplexity on held-out text, the same windows for every model. The dense model is the floor; "
           "compare each pruned model with it and EBFT with the method it started from.",
    "heat": "The fraction of each projection's weights pruned in each block (zeroed, or removed with their head or "
            "channel by structured pruning), as measured after the run. Uniform colour means every layer got the "
            "target sparsity exactly.",
}

_cancel: dict[str, threading.Event] = {}  # session -> its Stop flag (never the model: that stays in the engine)
_lock = threading.Lock()


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> RunConfig:
    return RunConfig.from_yaml(PRESETS_DIR / f"{name}.yaml")


def teaching_pages() -> list[tuple[str, str]]:
    """(title, body) of each assets/teaching/*.md, in file-name order; the title is the page's '# ' line."""
    pages = []
    for page in sorted(TEACHING_DIR.glob("*.md")):
        first, _, body = page.read_text(encoding="utf-8").partition("\n")
        pages.append((first[2:].strip(), body) if first.startswith("# ") else (page.stem, first + "\n" + body))
    return pages


def fill_from_preset(name: str, loaded: str) -> list[Any]:
    if name == loaded or name not in preset_names():
        return [gr.skip()] * len(CONTROL_FIELDS) + [loaded]
    return config_to_values(load_preset(name)) + [name]


# ---- controls <-> config -------------------------------------------------------------------------------------
CONTROL_FIELDS = ["model", "prune.method", "prune.pattern", "prune.sparsity", "calib.source", "calib.nsamples",
                  "calib.seqlen", "ebft.epochs", "ebft.lr", "ebft.batch_size", "eval.source", "eval.seqlen",
                  "eval.windows", "baselines", "seed", "save_model", "recoveries", "prune.dsnot_init",
                  "prune.dsnot_layers", "prune.owl_lambda", "prune.owl_m", "lora.rank", "lora.lr", "lora.budget",
                  "eval.zeroshot", "eval.zeroshot_limit", "prune.keep_first", "prune.keep_last",
                  "prune.taylor_samples", "prune.taylor_seqlen", "calib.self_nsamples"]
METHOD_CHOICES = list(PRUNE_METHODS) + [OWL_PREFIX + m for m in ("wanda", "sparsegpt", "magnitude", "dsnot")]


def pattern_for_method(method: str, pattern: str) -> Any:
    """llm-pruner prunes structurally: show the pattern it implies, and leave structured when another method is
    chosen (every other method prunes weight by weight)."""
    if method in STRUCTURED_METHODS:
        return "structured"
    return "unstructured" if pattern == "structured" else gr.skip()


def sparsity_for_pattern(pattern: str) -> Any:
    """An N:M pattern fixes the sparsity (1 - N/M): the slider shows it, so the run does what the page says."""
    from ebft_engine.config import parse_pattern

    try:
        nm = parse_pattern(pattern)
    except ConfigError:
        return gr.skip()
    return gr.skip() if nm is None else round(1 - nm[0] / nm[1], 4)


def config_to_values(config: RunConfig) -> list[Any]:
    d = config.to_dict()
    values = []
    for name in CONTROL_FIELDS:
        node: Any = d
        for part in name.split("."):
            node = node[part]
        values.append(node)
    windows_at = CONTROL_FIELDS.index("eval.windows")
    values[windows_at] = values[windows_at] or 0
    seqlen_at = CONTROL_FIELDS.index("eval.seqlen")
    values[seqlen_at] = values[seqlen_at] or 0
    values[CONTROL_FIELDS.index("save_model")] = values[CONTROL_FIELDS.index("save_model")] or ""
    values[CONTROL_FIELDS.index("eval.zeroshot")] = ",".join(values[CONTROL_FIELDS.index("eval.zeroshot")] or [])
    values[CONTROL_FIELDS.index("eval.zeroshot_limit")] = values[CONTROL_FIELDS.index("eval.zeroshot_limit")] or 0
    return values


def values_to_config(values: list[Any], base: RunConfig | None = None) -> RunConfig:
    """Build the run config from the controls; raises ConfigError with the engine's own words."""
    fields = dict(zip(CONTROL_FIELDS, values))
    fields["eval.windows"] = _whole(fields["eval.windows"]) or None
    fields["eval.seqlen"] = _whole(fields["eval.seqlen"]) or None
    for name in ("calib.nsamples", "calib.seqlen", "ebft.epochs", "ebft.batch_size", "seed", "lora.rank"):
        fields[name] = _whole(fields[name])
    for name in ("prune.keep_first", "prune.keep_last", "prune.taylor_samples", "prune.taylor_seqlen",
                 "calib.self_nsamples"):
        fields[name] = _whole(fields[name])
    fields["baselines"] = list(fields["baselines"] or [])
    fields["recoveries"] = list(fields["recoveries"] or ["ebft"])
    fields["eval.zeroshot"] = [t.strip() for t in str(fields["eval.zeroshot"] or "").split(",") if t.strip()]
    fields["eval.zeroshot_limit"] = _whole(fields["eval.zeroshot_limit"]) or None
    fields["save_model"] = (fields["save_model"] or "").strip() or None
    base = base or RunConfig()
    return policy.check(base.with_overrides({**fields, "runs_dir": policy.runs_dir()}))


def _whole(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# ---- the run handler -----------------------------------------------------------------------------------------
def outputs_for(view: RunView) -> tuple:
    status = f"**{view.status}** — {view.progress}" if view.status == "running" else f"**{view.status}**"
    if view.errors:
        status += "\n\n" + "\n\n".join(f"⚠️ {e}" for e in view.errors)
    notices = "\n".join(f"- *{level}*: {text}" for level, text in view.notices[-12:])
    proto = tables.protocol(view)
    return (status, plots.loss_curves(view), plots.loss_bars(view), tables.ppl_table(view),
            f"Protocol: {proto}" if proto else "", plots.ppl_bars(view), plots.sparsity_heatmap(view), notices)


def start_run(model, method, pattern, sparsity, calib_source, nsamples, seqlen, epochs, lr, batch_size,
              eval_source, eval_seqlen, eval_windows, baselines, seed, save_model, recoveries, dsnot_init,
              dsnot_layers, owl_lambda, owl_m, lora_rank, lora_lr, lora_budget, zeroshot,
              zeroshot_limit, keep_first, keep_last, taylor_samples, taylor_seqlen, self_nsamples,
              request: gr.Request):
    """Generator behind Run: streams a few updates a second while the engine works, and the final state.

    The parameters follow CONTROL_FIELDS; ``request`` identifies the browser session, so Stop stops only it.
    """
    values = [model, method, pattern, sparsity, calib_source, nsamples, seqlen, epochs, lr, batch_size, eval_source,
              eval_seqlen, eval_windows, baselines, seed, save_model, recoveries, dsnot_init, dsnot_layers,
              owl_lambda, owl_m, lora_rank, lora_lr, lora_budget, zeroshot, zeroshot_limit, keep_first, keep_last,
              taylor_samples, taylor_seqlen, self_nsamples]
    session = getattr(request, "session_hash", None) or "local"
    view = RunView()
    try:
        config = values_to_config(values)
    except EbftError as e:
        view.status = "failed"
        view.notices.append(("error", str(e)))
        yield (*outputs_for(view), None)
        return
    _close_paused_steppers()
    yield from _stream(lambda cancel: engine_events(config, cancel), view, session)


def _stream(start, view: RunView, session: str):
    """Drive one engine run for a session: a few updates a second, then the final state with the record."""
    cancel = threading.Event()
    with _lock:
        _cancel[session] = cancel
    throttle = Throttle(0.4)
    try:
        for event in start(None if policy.on_zero_gpu() else cancel):  # an Event cannot cross to a ZeroGPU worker
            view.apply(event)
            force = isinstance(event, (BlockFinished, EvalFinished, RunFinished))
            if throttle.ready(force):
                yield (*outputs_for(view), None)
    except EbftError as e:  # refused before it started (e.g. the runs folder is not writable)
        view.status = "failed"
        view.notices.append(("error", str(e)))
    finally:
        with _lock:
            if _cancel.get(session) is cancel:
                del _cancel[session]
    yield (*outputs_for(view), _archive(view.run_dir))


def resume_run(run_name: str | None, request: gr.Request):
    """Generator behind History's Resume: continue an interrupted, cancelled or failed run from its last finished
    block, showing its earlier curves and numbers first. Takes a run's name from the list, never a path."""
    session = getattr(request, "session_hash", None) or "local"
    try:
        run_dir = _run_folder(run_name)
        view = tables.load_view(run_dir)  # what the run showed before it stopped
    except EbftError as e:
        view = RunView(status="failed", notices=[("error", str(e))])
        yield (*outputs_for(view), None)
        return
    view.status, view.summary = "running", None
    _close_paused_steppers()
    yield from _stream(lambda cancel: engine_resume(str(run_dir), cancel), view, session)


def _run_folder(run_name: str | None) -> Path:
    names = set(tables.list_runs(policy.runs_dir())["run"])
    if not run_name or run_name not in names:
        raise ConfigError("resume", f"{run_name!r} is not a run in the history", "choose one from the list")
    return Path(policy.runs_dir()) / run_name


@spaces.GPU(duration=ZERO_GPU_SECONDS)
def engine_events(config: RunConfig, cancel: threading.Event | None = None):
    """The whole GPU job (load, prune, EBFT, evaluate) as one generator of events.

    On ZeroGPU a GPU exists only inside a call decorated with ``spaces.GPU``, run in a worker process: so the job
    is one decorated generator that yields plain CPU-side events. Everywhere else the decorator does nothing.
    """
    yield from run(config, cancel)


@spaces.GPU(duration=ZERO_GPU_SECONDS)
def engine_resume(run_dir: str, cancel: threading.Event | None = None):
    """The GPU job of a resumed run (see engine_events)."""
    yield from resume(run_dir, cancel)


def stop_run(request: gr.Request) -> str:
    session = getattr(request, "session_hash", None) or "local"
    with _lock:
        flag = _cancel.get(session)
        stepper = _steppers.pop(session, None)
    if stepper is not None:  # a paused step-mode run: close it, which records it as cancelled
        stepper[0].close()
        return "Step-by-step run stopped."
    if flag is None:
        return "Nothing is running."
    flag.set()
    return "Stopping after the current step…"


# Step mode, for a classroom: each click runs until the next block is finished, then the engine's generator
# waits, suspended, in this per-session registry until the next click (or Stop, or a new run).
_steppers: dict[str, tuple[Any, RunView]] = {}


def step_run(model, method, pattern, sparsity, calib_source, nsamples, seqlen, epochs, lr, batch_size,
             eval_source, eval_seqlen, eval_windows, baselines, seed, save_model, recoveries, dsnot_init,
             dsnot_layers, owl_lambda, owl_m, lora_rank, lora_lr, lora_budget, zeroshot,
             zeroshot_limit, keep_first, keep_last, taylor_samples, taylor_seqlen, self_nsamples,
              request: gr.Request):
    """Generator behind Step: the first click starts a run; every click advances it by one block."""
    session = getattr(request, "session_hash", None) or "local"
    with _lock:
        stepper = _steppers.pop(session, None)
    if stepper is None:
        values = [model, method, pattern, sparsity, calib_source, nsamples, seqlen, epochs, lr, batch_size,
                  eval_source, eval_seqlen, eval_windows, baselines, seed, save_model, recoveries, dsnot_init,
                  dsnot_layers, owl_lambda, owl_m, lora_rank, lora_lr, lora_budget, zeroshot, zeroshot_limit,
                  keep_first, keep_last, taylor_samples, taylor_seqlen, self_nsamples]
        view = RunView()
        _close_paused_steppers()
        try:
            events = run(values_to_config(values))
        except EbftError as e:
            view.status = "failed"
            view.notices.append(("error", str(e)))
            yield (*outputs_for(view), None)
            return
    else:
        events, view = stepper
    throttle = Throttle(0.4)
    for event in events:
        view.apply(event)
        if isinstance(event, BlockFinished):
            with _lock:
                _steppers[session] = (events, view)
            view_note = f"block {event.block + 1} of {event.total} done ({event.label}); press Step for the next"
            yield (*_with_status(outputs_for(view), view_note), None)
            return
        if throttle.ready(isinstance(event, EvalFinished)):
            yield (*outputs_for(view), None)
    yield (*outputs_for(view), _archive(view.run_dir))


def _close_paused_steppers() -> None:
    """A new run takes the one loaded model: paused step-by-step runs cannot go on, so they end as cancelled."""
    with _lock:
        paused = list(_steppers.values())
        _steppers.clear()
    for events, _view in paused:
        events.close()


def _with_status(outputs: tuple, note: str) -> tuple:
    return (f"**paused** — {note}",) + tuple(outputs[1:])


def _archive(run_dir: str) -> str | None:
    """The run folder as a zip for download."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    target = Path(tempfile.mkdtemp(prefix="ebft-run-")) / Path(run_dir).name
    return shutil.make_archive(str(target), "zip", run_dir)


THIS_MACHINE = "this machine"


def plan_run(*values) -> str:
    """The memory planner's prediction for the current settings, before anything is loaded: on this machine, or
    on a named card (the last value; the same card list as ``python -m ebft_engine plan --gpu``)."""
    from ebft_engine.cards import CARDS, plan_text
    from ebft_engine.device import pick_device, pick_precision
    from ebft_engine.models import count_params, load_config, resolve_source
    from ebft_engine.planner import capacities, plan_memory, remedy

    *values, card = values
    try:
        config = values_to_config(list(values))
        if card in CARDS:
            text, _fits = plan_text(config, CARDS[card])
            return f"```\n{text}\n```"
        source = resolve_source(config.model)
        model_config = load_config(source)
        device = pick_device(config.device)
        precision = pick_precision(device, config.dtype, count_params(model_config))
    except EbftError as e:
        return f"⚠️ {e}"
    device_capacity, host_capacity = capacities(device)
    plan = plan_memory(model_config, config, precision, device_capacity=device_capacity,
                       host_capacity=host_capacity, gguf=source.gguf_file is not None)
    verdict = "fits" if plan.fits else (f"**does not fit**: {plan.problem}; "
                                        f"{remedy(plan, model_config, config, precision)}")
    return f"{plan.summary()} — {verdict}.\n\n{plan.table()}"


def export_yaml(*values) -> tuple[str | None, str]:
    try:
        config = values_to_config(list(values))
    except EbftError as e:
        return None, f"⚠️ {e}"
    path = Path(tempfile.mkdtemp(prefix="ebft-config-")) / "ebft-config.yaml"
    data = config.to_dict()
    data.pop("runs_dir", None)
    path.write_text("# python -m ebft_engine run --config ebft-config.yaml\n" + yaml.safe_dump(data, sort_keys=False))
    return str(path), "Reproduce it with `python -m ebft_engine run --config ebft-config.yaml`."


# ---- history -------------------------------------------------------------------------------------------------
def refresh_history():
    table = tables.list_runs(policy.runs_dir())
    stopped = list(table.loc[table["status"].isin(tables.RESUMABLE), "run"])
    return (table, gr.update(choices=list(table["run"]), value=[]),
            gr.update(choices=stopped, value=stopped[0] if stopped else None))


def compare_runs(selected: list[str]):
    if not selected:
        return plots.compare_curves({}), tables.compare_table({})
    views = {name: tables.load_view(Path(policy.runs_dir()) / name) for name in selected}
    return plots.compare_curves(views), tables.compare_table(views)


# ---- layout --------------------------------------------------------------------------------------------------
def build_app() -> gr.Blocks:
    spaces = policy.on_spaces()
    defaults = config_to_values(load_preset(DEFAULT_PRESET))
    with gr.Blocks(title="EBFT Lab") as demo:
        gr.Markdown("# EBFT Lab\nPrune a language model, then win its accuracy back with block-wise "
                    "reconstruction fine-tuning (EBFT). Pick a preset, press **Run**, and watch every block learn.")
        with gr.Tabs() as tabs:
            with gr.Tab("Lab", id="lab"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        preset = gr.Dropdown(preset_names(), value=DEFAULT_PRESET, label="Preset")
                        controls = _setup_panel(defaults, spaces)
                        with gr.Row():
                            run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
                            step_btn = gr.Button("Step", elem_id="step-btn")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                        gr.Markdown("**Step** runs one block per click (for a classroom); **Stop** ends either kind of run.")
                        with gr.Row():
                            plan_btn = gr.Button("Memory plan", elem_id="plan-btn")
                            plan_card = gr.Dropdown([THIS_MACHINE, *CARDS], value=THIS_MACHINE, label="for",
                                                    elem_id="plan-card", min_width=120)
                        plan_md = gr.Markdown(elem_id="plan")
                        export_btn = gr.Button("Download config as YAML")
                        yaml_file = gr.File(label="config", interactive=False)
                        yaml_note = gr.Markdown()
                    with gr.Column(scale=2):
                        status = gr.Markdown("**idle**", elem_id="status")
                        loss_plot = gr.Plot(label="loss", elem_id="loss-plot")
                        gr.Markdown(HOW_TO_READ["loss"])
                        bars_plot = gr.Plot(label="per block", elem_id="bars-plot")
                        gr.Markdown(HOW_TO_READ["bars"])
                        ppl_df = gr.Dataframe(headers=tables.PPL_COLUMNS, label="Perplexity", interactive=False,
                                              elem_id="ppl-table")
                        proto_md = gr.Markdown()
                        ppl_plot = gr.Plot(label="perplexity", elem_id="ppl-plot")
                        gr.Markdown(HOW_TO_READ["ppl"])
                        heat_plot = gr.Plot(label="sparsity", elem_id="heat-plot")
                        gr.Markdown(HOW_TO_READ["heat"])
                        notices = gr.Markdown()
                        record = gr.File(label="run record (zip)", interactive=False)
            with gr.Tab("History"):
                refresh_btn = gr.Button("Refresh")
                runs_df = gr.Dataframe(label="Runs", interactive=False)
                chosen = gr.CheckboxGroup([], label="Compare runs")
                compare_btn = gr.Button("Compare")
                compare_plot = gr.Plot(label="compared")
                compare_df = gr.Dataframe(label="Perplexities compared", interactive=False)
                gr.Markdown("**Resume** a run that was interrupted (a crash, a closed machine), stopped or failed: "
                            "it goes on from its last finished block, in the Lab tab, and ends as if it had never "
                            "stopped.")
                with gr.Row():
                    to_resume = gr.Dropdown([], label="Stopped runs", elem_id="resume-choice", scale=3)
                    resume_btn = gr.Button("Resume", elem_id="resume-btn", scale=1)
            with gr.Tab("Learn"):
                gr.HTML((TEACHING_DIR / "ebft-figure.svg").read_text(encoding="utf-8"), elem_id="ebft-figure")
                for title, text in teaching_pages():
                    with gr.Accordion(title, open=False):
                        gr.Markdown(text)

        outputs = [status, loss_plot, bars_plot, ppl_df, proto_md, ppl_plot, heat_plot, notices, record]
        # A dropdown can report the same choice again (on blur): refill the controls only when the preset changed,
        # so edits made after choosing a preset are never silently undone.
        loaded = gr.State(DEFAULT_PRESET)
        preset.change(fill_from_preset, [preset, loaded], controls + [loaded])
        method_box = controls[CONTROL_FIELDS.index("prune.method")]
        pattern_box = controls[CONTROL_FIELDS.index("prune.pattern")]
        method_box.change(pattern_for_method, [method_box, pattern_box], pattern_box, queue=False)
        pattern_box.change(sparsity_for_pattern, pattern_box, controls[CONTROL_FIELDS.index("prune.sparsity")],
                           queue=False)
        run_evt = run_btn.click(start_run, controls, outputs, concurrency_id=GPU, concurrency_limit=1, api_name="run",
                      show_progress="hidden")
        step_btn.click(step_run, controls, outputs, concurrency_id=GPU, concurrency_limit=1, api_name="step",
                       show_progress="hidden")
        # On ZeroGPU the run lives in a worker process the Stop flag cannot reach: there Stop also cancels the event.
        stop_btn.click(stop_run, None, notices, queue=False, api_name="stop",
                       cancels=[run_evt] if policy.on_zero_gpu() else None)
        export_btn.click(export_yaml, controls, [yaml_file, yaml_note], api_name="export_yaml")
        plan_btn.click(plan_run, [*controls, plan_card], plan_md, api_name="plan")
        history = [runs_df, chosen, to_resume]
        refresh_btn.click(refresh_history, None, history, api_name="history")
        compare_btn.click(compare_runs, chosen, [compare_plot, compare_df], api_name="compare")
        resume_btn.click(lambda: gr.Tabs(selected="lab"), None, tabs, queue=False).then(
            resume_run, to_resume, outputs, concurrency_id=GPU, concurrency_limit=1, api_name="resume",
            show_progress="hidden")
        demo.load(refresh_history, None, history)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def _setup_panel(defaults: list[Any], spaces: bool) -> list[gr.components.Component]:
    v = dict(zip(CONTROL_FIELDS, defaults))
    models = list(policy.PRESET_MODELS)
    model = gr.Dropdown(models, value=v["model"], allow_custom_value=True, label="Model",
                        info="a preset, or a hub id" + ("" if spaces else ", local folder or .gguf file"))
    with gr.Accordion("Pruning", open=True):
        method = gr.Dropdown(METHOD_CHOICES, value=v["prune.method"], label="Method (EBFT starts from it)",
                             info="owl-: OWL's outlier-weighted sparsity per block")
        pattern = gr.Dropdown(["unstructured", "2:4", "4:8", "structured"], value=v["prune.pattern"],
                              label="Pattern", info="structured: whole heads and MLP channels (method llm-pruner)")
        sparsity = gr.Slider(0.0, 0.95, value=v["prune.sparsity"], step=0.05, label="Sparsity",
                             info="unstructured: per layer; structured: of all blocks' weights; N:M fixes it")
        baselines = gr.CheckboxGroup(METHOD_CHOICES, value=v["baselines"], label="Baselines to compare")
        recoveries = gr.CheckboxGroup(list(RECOVERIES), value=v["recoveries"], label="Recoveries",
                                      info="ebft: target the dense block on the sparse inputs (the paper); "
                                           "ebft-gp: the dense model's own stream")
        with gr.Row():
            dsnot_init = gr.Dropdown(list(DSNOT_INITS), value=v["prune.dsnot_init"], label="DSnoT refines")
            dsnot_layers = gr.Dropdown(list(DSNOT_LAYERS), value=v["prune.dsnot_layers"], label="DSnoT layers",
                                       info="attention: q, k, v, o only (the reference default)")
        with gr.Row():
            owl_lambda = gr.Number(v["prune.owl_lambda"], label="OWL λ (sparsity spread)")
            owl_m = gr.Number(v["prune.owl_m"], label="OWL M (outlier threshold)")
        with gr.Row():
            keep_first = gr.Number(v["prune.keep_first"], precision=0, label="Structured: keep first blocks")
            keep_last = gr.Number(v["prune.keep_last"], precision=0, label="Structured: keep last blocks")
        with gr.Row():
            taylor_samples = gr.Number(v["prune.taylor_samples"], precision=0, label="Taylor importance: samples")
            taylor_seqlen = gr.Number(v["prune.taylor_seqlen"], precision=0, label="Taylor importance: tokens each")
    with gr.Accordion("Calibration", open=False):
        calib = gr.Dropdown(["self", "c4", "wikitext2"], value=v["calib.source"], allow_custom_value=not spaces,
                            label="Source", info="self: text the model writes itself" +
                            ("" if spaces else "; or file:PATH"))
        nsamples = gr.Number(v["calib.nsamples"], precision=0, label="Samples")
        seqlen = gr.Number(v["calib.seqlen"], precision=0, label="Tokens per sample")
        self_nsamples = gr.Number(v["calib.self_nsamples"], precision=0, label="Add self-generated samples",
                                  info="for the reconstruction only (Shin et al.); not with source self")
    with gr.Accordion("EBFT", open=False, elem_id="acc-ebft"):
        epochs = gr.Number(v["ebft.epochs"], precision=0, label="Epochs per block")
        lr = gr.Number(v["ebft.lr"], label="Learning rate")
        batch = gr.Number(v["ebft.batch_size"], precision=0, label="Batch size")
    with gr.Accordion("LoRA (when chosen under Recoveries)", open=False):
        lora_rank = gr.Number(v["lora.rank"], precision=0, label="Rank")
        lora_lr = gr.Number(v["lora.lr"], label="Learning rate")
        lora_budget = gr.Dropdown(["ebft", "epochs"], value=v["lora.budget"], label="Budget",
                                  info="ebft: the same wall-clock time as EBFT in this run")
    with gr.Accordion("Evaluation", open=False):
        eval_source = gr.Dropdown(["wikitext2", "c4", "ptb"], value=v["eval.source"], allow_custom_value=not spaces,
                                  label="Source")
        eval_seqlen = gr.Number(v["eval.seqlen"], precision=0, label="Window (tokens; 0 = model context)")
        eval_windows = gr.Number(v["eval.windows"], precision=0, label="Windows (0 = all)")
        zeroshot = gr.Textbox(v["eval.zeroshot"], label="Zero-shot tasks (lm-eval)",
                              placeholder="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
        zeroshot_limit = gr.Number(v["eval.zeroshot_limit"], precision=0, label="Examples per task (0 = all)")
    with gr.Accordion("Run", open=False):
        seed = gr.Number(v["seed"], precision=0, label="Seed")
        save = gr.Textbox(v["save_model"], label="Save the EBFT model to folder (optional)", visible=not spaces)
    return [model, method, pattern, sparsity, calib, nsamples, seqlen, epochs, lr, batch, eval_source, eval_seqlen,
            eval_windows, baselines, seed, save, recoveries, dsnot_init, dsnot_layers, owl_lambda, owl_m, lora_rank,
            lora_lr, lora_budget, zeroshot, zeroshot_limit, keep_first, keep_last, taylor_samples, taylor_seqlen,
            self_nsamples]


def main(options: dict[str, Any]) -> None:
    """Serve the lab with :func:`lab.policy.server_options` (checked by app.py before Gradio is imported)."""
    build_app().launch(**options, css_paths=[str(ROOT / "assets" / "style.css")])
