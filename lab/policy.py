"""What the lab allows, on a workstation and on a Hugging Face Space (``SPACE_ID`` set)."""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from ebft_engine import ConfigError, RunConfig, registry
from ebft_engine.config import CALIB_SOURCES, EVAL_SOURCES
from ebft_engine.models import count_params, load_config, resolve_source

PRESET_MODELS = ("smollm2-135m", "tiny-random")
# Bounds on a Space (2 CPU cores, shared by every visitor): a run ends in minutes.
SPACES_LIMITS = {"calib.nsamples": 64, "calib.seqlen": 512, "ebft.epochs": 4, "eval.windows": 16,
                 "eval.seqlen": 1024}
ZERO_GPU_SECONDS = 300  # the GPU slot of one job on ZeroGPU (spaces.GPU's duration, lab/runner.py)
SPACES_CPU_SECONDS = 900  # the longest a visitor of a CPU Space waits for a run at SPACES_LIMITS

# How long a run takes on a Space, estimated from measured runs (README, Performance) on 2 CPU cores, every phase
# scaled by the model's parameters (each phase pushes its tokens through every weight) and by its own work:
#  - the smollm2-demo preset, SmolLM2-135M (134,515,008 parameters), 255 s end to end = load 38 + three
#    evaluations 57 (dense, wanda, ebft: 19 each over 16 x 1024 tokens) + the wanda baseline's pruning 31 + EBFT
#    129 (2 epochs, its own Wanda pass included), with 32 x 512 calibration tokens (239 s in an earlier session);
#  - pruning passes of slower methods on the same model and calibration ("ALPS, and SparseGPT today"):
#    SparseGPT 403 s, ALPS 2,429 s; any other method is taken at Wanda's 31 s.
# Each baseline adds its pruning pass and an evaluation; each recovery EBFT's 129 s per 2 epochs (a recovery
# other than EBFT likewise: LoRA's default budget is EBFT's own time) and its evaluations; pruning and training
# scale with the calibration tokens, evaluations with theirs. Not counted: generating `self` calibration text
# (~110 s, once: it is cached) and zero-shot scoring (not measured here; at most 100 examples per task).
# MARGIN allows for this machine's run-to-run speed: a judgment, not a measurement (the demo took 239 and 255 s).
DEMO_PARAMS = 134_515_008
DEMO_SECONDS = {"load": 38, "eval": 19, "prune": 31, "ebft": 129}
DEMO_TOKENS = {"calib": 32 * 512, "eval": 16 * 1024}
PRUNE_SECONDS = {"sparsegpt": 403, "alps": 2429}  # by method (an allocation prefix, owl-, prunes as its method)
MARGIN = 1.25

# The largest model a Space runs, in parameters, counted from the model's config before any weight is read: the
# smollm2-spaces preset (a wanda baseline and EBFT) at SPACES_LIMITS, 64 samples and 4 epochs, takes
# 38 + 3 x 19 + 2 x 31 + 4 x 129 = 673 s on SmolLM2-135M, x MARGIN = 841 s: 6.25 us per parameter.
#  - CPU Space: 900 s / 6.25 us = 143.9M parameters (SmolLM2-135M fits; SmolLM2-360M's 362M would take ~38 min).
#    A run under the bound with more variants, a slower method or more tokens is checked against the same
#    900 s by its own estimate (run_seconds) and refused naming what to drop.
#  - ZeroGPU: a run estimated at 900 s on 2 CPU cores, of which the load (51 s at the bound) is no faster on a
#    GPU, must fit its other 849 s into the 249 s left of the 300 s slot: the GPU must do the matrix products
#    3.4x as fast as 2 CPU cores (measured bf16 peak 0.66-1.1 TFLOP/s). No GPU run has been measured in this
#    project yet; any data-centre GPU has over a hundred times that peak, so the CPU-derived estimate also keeps
#    a ZeroGPU run inside its slot. (A measured GPU run could raise the bound there.)
SECONDS_PER_PARAM = (38 + 57 + 2 * 31 + 4 * 129) * MARGIN / DEMO_PARAMS  # at SPACES_LIMITS, on 2 CPU cores
SPACES_MAX_PARAMS = int(SPACES_CPU_SECONDS / SECONDS_PER_PARAM)


def on_spaces() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def on_zero_gpu() -> bool:
    """A ZeroGPU Space: the GPU is attached only inside ``spaces.GPU`` calls, in a worker process."""
    return on_spaces() and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def runs_dir() -> str:
    return os.environ.get("EBFT_RUNS_DIR", "runs")


def check(config: RunConfig, spaces: bool | None = None) -> RunConfig:
    """Return the config if this deployment allows it; raise ConfigError saying what to change otherwise."""
    if not (on_spaces() if spaces is None else spaces):
        return config
    _check_local_paths(config)
    _check_zeroshot(config)
    _check_sizes(config)
    _check_params(config)  # last: it reads the model's config (from the hub for a hub id)
    return config


def _check_local_paths(config: RunConfig) -> None:
    """A Space reads no local model or data file, and writes no model."""
    model = config.model
    if model not in PRESET_MODELS and (model.startswith(("/", ".", "~")) or model.endswith(".gguf")
                                       or Path(model).exists() or model.count("/") != 1):
        raise ConfigError("model", f"{model!r} is a local path; this Space loads models only by hub id "
                          "(org/name) or preset", f"pick {' or '.join(PRESET_MODELS)}, or a hub id")
    for name, sources in (("calib.source", CALIB_SOURCES), ("eval.source", EVAL_SOURCES)):
        section, field = name.split(".")
        if getattr(getattr(config, section), field).startswith("file:"):  # offer the field's own sources only
            raise ConfigError(name, "local files cannot be read on this Space", f"use {', '.join(sources)}")
    if config.save_model:
        raise ConfigError("save_model", "this Space does not save models to disk", "run the lab locally to save")


def _check_zeroshot(config: RunConfig) -> None:
    if config.eval.zeroshot and (config.eval.zeroshot_limit or 10 ** 9) > 100:
        raise ConfigError("eval.zeroshot_limit", "full zero-shot tasks are too long for this Space",
                          "set at most 100 examples per task, or run the lab locally")
    if config.eval.zeroshot_include:
        raise ConfigError("eval.zeroshot_include", "local task folders cannot be read on this Space",
                          "use lm-eval's own task names")


def _check_sizes(config: RunConfig) -> None:
    for name, limit in SPACES_LIMITS.items():
        section, field = name.split(".")
        value = getattr(getattr(config, section), field)
        if value is None and name == "eval.windows":
            raise ConfigError(name, "a full evaluation is too long for this Space",
                              f"evaluate at most {limit} windows")
        if value is not None and value > limit:
            raise ConfigError(name, f"{value} is above this Space's limit of {limit}",
                              f"use at most {limit}, or run the lab locally")


def _check_params(config: RunConfig) -> None:
    """Refuse a model too large to finish on this Space (SPACES_MAX_PARAMS), then a run of an allowed model whose
    own estimate (run_seconds: its variants, method, epochs and tokens) exceeds the Space's time, naming what to
    drop. Reads the model's config only; a model whose config cannot be read is refused here with the engine's
    sentence (ModelLoadError)."""
    n = count_params(load_config(resolve_source(config.model)))
    slot = (f"the {ZERO_GPU_SECONDS} s GPU slot" if on_zero_gpu()
            else f"{SPACES_CPU_SECONDS // 60} minutes on its 2 CPU cores")
    if n > SPACES_MAX_PARAMS:
        raise ConfigError("model", f"{config.model} has {n / 1e6:.0f}M parameters, more than this Space runs "
                          f"({SPACES_MAX_PARAMS / 1e6:.0f}M: a larger run would not finish within {slot})",
                          f"pick smollm2-135m or a hub model of at most {SPACES_MAX_PARAMS / 1e6:.0f}M parameters, "
                          "or run the lab locally")
    _check_time(config, n, slot)


def run_seconds(config: RunConfig, n_params: int, baselines: tuple[str, ...] | None = None,
                recoveries: tuple[str, ...] | None = None) -> float:
    """The estimated seconds of ``config``'s run on 2 CPU cores, MARGIN included (the measured phases above),
    for a model of ``n_params``; ``baselines`` / ``recoveries`` replace the config's (what dropping some saves)."""
    baselines = config.baselines if baselines is None else baselines
    recoveries = config.recoveries if recoveries is None else recoveries
    calib = config.calib.nsamples * config.calib.seqlen / DEMO_TOKENS["calib"]
    train = (config.calib.nsamples + config.calib.self_nsamples) * config.calib.seqlen / DEMO_TOKENS["calib"]
    windows = config.eval.windows or SPACES_LIMITS["eval.windows"]  # None is refused before (_check_sizes)
    evaluation = DEMO_SECONDS["eval"] * windows * (config.eval.seqlen or 2048) / DEMO_TOKENS["eval"]

    def prune(method: str) -> float:
        _allocation, entry = registry.split_method(method)
        return PRUNE_SECONDS.get(entry.name if entry else method, DEMO_SECONDS["prune"]) * calib

    seconds = DEMO_SECONDS["load"] + evaluation  # the dense model
    seconds += sum(prune(b) + evaluation for b in baselines)
    active = [r for r in (registry.recovery_entry(name).build() for name in recoveries) if r.active(config)]
    for r in active:  # EBFT's measured time has Wanda's pass in it: a slower method adds its difference
        epochs = config.lora.epochs if r.name == "lora" and config.lora.budget == "epochs" else config.ebft.epochs
        seconds += (DEMO_SECONDS["ebft"] * epochs / 2 * train + prune(config.prune.method)
                    - DEMO_SECONDS["prune"] * calib + evaluation * len(r.labels(r.name)))
    if not active and config.prune.method not in baselines:  # --method pruned alone (runner.Run.variants)
        seconds += prune(config.prune.method) + evaluation
    return seconds * n_params / DEMO_PARAMS * MARGIN


def _check_time(config: RunConfig, n: int, slot: str) -> None:
    """Refuse a run whose estimate exceeds SPACES_CPU_SECONDS, saying what to drop: baselines and recoveries (one
    recovery stays), the costliest first until the rest fits; when no such drop is enough, the lever that is: a
    faster --method than a slow one, else fewer tokens or epochs."""
    total = run_seconds(config, n)
    if total <= SPACES_CPU_SECONDS:
        return
    problem = (f"this run would take about {total / 60:.0f} minutes on 2 CPU cores (estimated from measured runs, "
               f"lab/policy.py) and would not finish within {slot}")
    kept = {"baselines": list(config.baselines), "recoveries": list(config.recoveries)}
    dropped: dict[str, list[str]] = {}
    while total > SPACES_CPU_SECONDS:  # drop the variant whose removal saves most
        options = [("baselines", b) for b in kept["baselines"]] + (
            [("recoveries", r) for r in kept["recoveries"]] if len(kept["recoveries"]) > 1 else [])
        options.reverse()  # a tie drops the later-listed one: the first recovery, usually ebft, stays
        if not options:
            break
        field, name = min(options, key=lambda o: run_seconds(config, n, *_without(kept, o)))
        kept[field].remove(name)
        dropped.setdefault(field, []).append(name)
        total = run_seconds(config, n, tuple(kept["baselines"]), tuple(kept["recoveries"]))
    drop = " and ".join(f"{', '.join(names)} from {field}" for field, names in dropped.items())
    if total <= SPACES_CPU_SECONDS:
        raise ConfigError(next(iter(dropped)), problem, f"drop {drop}, or run the lab locally")
    method = config.prune.method
    _allocation, entry = registry.split_method(method)
    if entry is not None and entry.name in PRUNE_SECONDS:
        raise ConfigError("prune.method", problem, f"prune with a faster method than {method} (e.g. wanda), "
                          "or run the lab locally")
    raise ConfigError("calib.nsamples", problem, "use fewer calibration samples (calib.nsamples, "
                      "calib.self_nsamples) or EBFT epochs, or run the lab locally")


def _without(kept: dict[str, list[str]], option: tuple[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    field, name = option
    return tuple(b for b in kept["baselines"] if (field, b) != option), tuple(
        r for r in kept["recoveries"] if (field, r) != option)


def server_options(env: dict[str, str] | None = None) -> dict[str, object]:
    """Where the lab listens: Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when set (a second lab, a
    busy port; an empty value counts as unset), else 127.0.0.1:7860 (0.0.0.0 on Spaces). A bad port, or a host
    name that does not resolve, is a ConfigError naming the variable. Gradio reads both variables when it is
    imported: check before that import (and drop empty ones: :func:`drop_empty_server_variables`)."""
    env = os.environ if env is None else env
    name = env.get("GRADIO_SERVER_NAME", "").strip() or ("0.0.0.0" if on_spaces() else "127.0.0.1")
    raw = env.get("GRADIO_SERVER_PORT", "").strip() or "7860"
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigError("GRADIO_SERVER_PORT", f"{raw!r} is not a port number", "set it to a free port in "
                          "1-65535, e.g. GRADIO_SERVER_PORT=7861 python app.py")
    try:
        socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ConfigError("GRADIO_SERVER_NAME", f"{name!r} is not a host name this machine can resolve",
                          "set it to one of this machine's addresses, e.g. 127.0.0.1 (this machine only) or "
                          "0.0.0.0 (every interface), or unset it") from None
    return {"server_name": name, "server_port": port}


SERVER_VARIABLES = ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT")


def drop_empty_server_variables(env: dict[str, str] | None = None) -> None:
    """Remove GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when set to nothing: Gradio's import reads them itself, and
    int('') is a traceback there. Unset, they mean what :func:`server_options` chose (and passes explicitly)."""
    env = os.environ if env is None else env
    for name in SERVER_VARIABLES:
        if name in env and not env[name].strip():
            del env[name]


def listen_failure(name: str, port: int) -> str:
    """Why Gradio could not listen on ``name``:``port`` (it reports every failure as no empty port), as the
    one line app.py prints: the address is not this machine's, or the port is in use."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in name else socket.AF_INET) as probe:
            probe.bind((name, port))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            return (f"GRADIO_SERVER_NAME: {name} is not an address of this machine; set it to one that is, e.g. "
                    "127.0.0.1 or 0.0.0.0, or unset it")
    return (f"GRADIO_SERVER_PORT: port {port} on {name} is in use; set GRADIO_SERVER_PORT to a free port, e.g. "
            "GRADIO_SERVER_PORT=7861 python app.py")
