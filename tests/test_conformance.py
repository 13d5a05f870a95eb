"""Conformance (issue #13): what every registered method and recovery must do, read from the registries, so
that a method or a recovery added as one new file is tested without editing this file.

- every mask method (``registry.pruning_entries("mask")``), with each choice of its options, on every pattern:
  exact sparsity at its granularity (per row or per matrix; N:M: exactly N kept in every group of M), a
  boolean mask of the weight's shape, pruned weights zero in any returned weight, inputs left untouched, and
  zeros already in the weight removed rather than kept;
- the registries themselves: descriptions, option help and defaults, method names, recoveries that build;
- the proof that adding a method or a recovery is adding one file: a throwaway file is written into the
  package and a run of the CLI (a fresh process, so discovery sees it) uses it end to end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from ebft_engine import registry
from ebft_engine.config import PruneConfig
from ebft_engine.sparsity import LayerStats, get_method, prune_count

ROOT = Path(__file__).resolve().parents[1]

# ---- the mask methods ---------------------------------------------------------------------------------------
# How each statistic a method may declare in ``needs`` is built (sparsity/stats.py, from a calibration matrix).
STAT_FIELDS = {"input_norms": ("input_norms",), "hessian": ("hessian",), "moments": ("token_mean_sum", "token_var")}

# (layer name, rows, columns): the second is wider than SparseGPT's 128-column block. Both column counts are
# multiples of 8 (4:8) and make per-row and per-matrix counts differ at the unstructured sparsities below.
SHAPES = [("q_proj", 24, 64), ("down_proj", 12, 136)]
PATTERNS = [("unstructured", 0.3), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)]


def _option_cases(entry: registry.PruningEntry) -> list[dict]:
    """The method's defaults, then each other choice of each of its options with choices, one at a time (DSnoT's
    initial mask changes what it reads and how it counts)."""
    cases: list[dict] = [{}]
    for f in dataclasses.fields(entry.options) if entry.options else ():
        for choice in f.metadata.get("choices") or ():
            if choice != f.default:
                cases.append({f.name: choice})
    return cases


MASK_CASES = [(entry.name, options) for entry in registry.pruning_entries("mask") for options in _option_cases(entry)]
MASK_IDS = [name + "".join(f"[{k}={v}]" for k, v in options.items()) for name, options in MASK_CASES]


def _layer(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A random weight and every statistic stats.py can compute, from a random calibration set X of uneven
    column scales: (sequences, tokens, in)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(6, 40, cols, generator=g) * torch.linspace(0.1, 3.0, cols)
    n, flat = x.shape[0], x.reshape(-1, cols)
    stats = {"input_norms": (flat ** 2).sum(0) / n, "hessian": 2.0 / n * flat.T @ flat,
             "token_mean_sum": flat.sum(0) / n, "token_var": flat.var(0, unbiased=False)}
    return weight, stats


def _stats_for(name: str, cfg: PruneConfig, available: dict[str, torch.Tensor]) -> LayerStats:
    """Only what the method declares it reads (``needs_with``): a method that reads more fails."""
    needs = get_method(name).needs_with(cfg)
    unknown = needs - set(STAT_FIELDS)
    assert not unknown, f"{name} reads {sorted(unknown)}: teach this suite to build them (see sparsity/stats.py)"
    return LayerStats(**{f: available[f] for need in needs for f in STAT_FIELDS[need]})


def _call(name: str, options: dict, pattern: str, sparsity: float, layer: str, weight: torch.Tensor,
          available: dict[str, torch.Tensor]):
    cfg = PruneConfig(method=name, sparsity=sparsity, pattern=pattern, **options)
    stats = _stats_for(name, cfg, available)
    result = get_method(name).fn(weight, stats, cfg.sparsity, cfg.nm, layer=layer, cfg=cfg)
    return result, stats, cfg


def _check_count(mask: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, what: str) -> None:
    rows, cols = mask.shape
    if nm is not None:
        n, m = nm
        kept = mask.reshape(rows, cols // m, m).sum(-1)
        assert bool((kept == n).all()), f"{what}: groups keep {sorted(set(kept.flatten().tolist()))}, not {n} of {m}"
        return
    removed_per_row = (~mask).sum(1)
    per_row, per_matrix = prune_count(cols, sparsity), prune_count(mask.numel(), sparsity)
    if bool((removed_per_row == per_row).all()):
        return  # exact per row (Wanda's comparison group)
    assert int((~mask).sum()) == per_matrix, (
        f"{what}: removes {int((~mask).sum())} weights (rows: {sorted(set(removed_per_row.tolist()))}); exact per "
        f"row is {per_row} in every row, exact per matrix is {per_matrix}")


def _kept_columns(result, cols: int) -> torch.Tensor:
    """Input columns whose kept weights must be nonzero: all but the dead ones a method says it zeroed."""
    dead = result.dead_inputs if result.dead_inputs is not None else torch.zeros(cols, dtype=torch.bool)
    return ~dead.cpu()


@pytest.mark.parametrize("pattern,sparsity", PATTERNS, ids=[f"{p}-{s}" for p, s in PATTERNS])
@pytest.mark.parametrize("layer,rows,cols", SHAPES, ids=[f"{r}x{c}" for _l, r, c in SHAPES])
@pytest.mark.parametrize("name,options", MASK_CASES, ids=MASK_IDS)
def test_mask_is_boolean_exact_and_zero_where_pruned(name, options, layer, rows, cols, pattern, sparsity):
    weight, available = _layer(rows, cols)
    result, _stats, cfg = _call(name, options, pattern, sparsity, layer, weight, available)
    mask = result.mask
    assert mask.dtype == torch.bool and mask.shape == weight.shape, (mask.dtype, tuple(mask.shape))
    _check_count(mask.cpu(), cfg.sparsity, cfg.nm, f"{name} {pattern} at {sparsity}")
    if result.weight is not None:
        assert result.weight.shape == weight.shape
        assert not bool(result.weight.cpu()[~mask.cpu()].any()), "a returned weight is nonzero where the mask prunes"


@pytest.mark.parametrize("pattern,sparsity", PATTERNS, ids=[f"{p}-{s}" for p, s in PATTERNS])
@pytest.mark.parametrize("name,options", MASK_CASES, ids=MASK_IDS)
def test_weight_and_statistics_are_not_modified_in_place(name, options, pattern, sparsity):
    layer, rows, cols = SHAPES[1]
    weight, available = _layer(rows, cols, seed=1)
    weight_before = weight.clone()
    cfg = PruneConfig(method=name, sparsity=sparsity, pattern=pattern, **options)
    stats = _stats_for(name, cfg, available)
    before = {f.name: getattr(stats, f.name).clone() for f in dataclasses.fields(LayerStats)
              if isinstance(getattr(stats, f.name), torch.Tensor)}
    get_method(name).fn(weight, stats, cfg.sparsity, cfg.nm, layer=layer, cfg=cfg)
    assert torch.equal(weight, weight_before), "the method changed the weight it was given"
    for key, value in before.items():
        assert torch.equal(getattr(stats, key), value), f"the method changed the statistics' {key}"


@pytest.mark.parametrize("pattern,sparsity", PATTERNS, ids=[f"{p}-{s}" for p, s in PATTERNS])
@pytest.mark.parametrize("layer,rows,cols", SHAPES, ids=[f"{r}x{c}" for _l, r, c in SHAPES])
@pytest.mark.parametrize("name,options", MASK_CASES, ids=MASK_IDS)
def test_zeros_already_in_the_weight_are_not_kept(name, options, layer, rows, cols, pattern, sparsity):
    """A weight that is already zero (a pruned model pruned again, a zero in a checkpoint) must be among the
    removed, not fill a kept place: kept yet zero, it would push the measured sparsity past the target. One zero
    per row fits every granularity (per row, per matrix, per N:M group)."""
    weight, available = _layer(rows, cols, seed=2)
    zero_cols = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(3))
    weight[torch.arange(rows), zero_cols] = 0
    result, _stats, cfg = _call(name, options, pattern, sparsity, layer, weight, available)
    mask = result.mask.cpu()
    pruned = (result.weight if result.weight is not None else weight).cpu() * mask
    live = mask & _kept_columns(result, cols).unsqueeze(0)
    kept_zeros = int((live & (pruned == 0)).sum())
    assert kept_zeros == 0, f"{name} keeps {kept_zeros} weights that are zero (the pre-existing zeros: " \
                            f"{int((~mask[torch.arange(rows), zero_cols]).sum())} of {rows} removed)"
    _check_count(mask, cfg.sparsity, cfg.nm, f"{name} {pattern} at {sparsity} with zeros in the weight")


# ---- the registries -----------------------------------------------------------------------------------------
def test_every_mask_method_has_a_description_and_a_kernel():
    entries = registry.pruning_entries("mask")
    assert entries, "no mask method registered"
    for entry in entries:
        assert isinstance(entry.description, str) and entry.description.strip(), f"{entry.name} has no description"
        method = get_method(entry.name)  # the sparsity registry and the engine's registry agree
        assert callable(method.fn) and method.needs <= set(STAT_FIELDS), (entry.name, sorted(method.needs))


def test_every_pruning_entry_has_a_description():
    for entry in registry.pruning_entries():
        assert entry.description.strip(), f"{entry.kind} {entry.name} has no description"
        assert entry.kind == "mask" or entry.build is not None, f"{entry.kind} {entry.name} has no build"


def test_every_option_has_help_and_a_default_that_passes_its_own_check():
    fields = registry.option_fields()
    for name, (entry, f) in fields.items():
        help_text = f.metadata.get("help")
        assert isinstance(help_text, str) and help_text.strip(), f"option {name} of {entry.name} has no help"
        assert f.default is not dataclasses.MISSING, f"option {name} of {entry.name} has no default"
        assert registry.check_option(name, f.default) == f.default, f"option {name}'s default changes when checked"
    assert PruneConfig().to_dict().keys() >= fields.keys()  # the defaults make a valid config


def test_every_method_name_validates_in_prune_config():
    names = registry.method_names()
    assert len(names) == len(set(names)), f"a method name is registered twice: {names}"
    for name in names:
        cfg = PruneConfig(method=name)
        assert cfg.method == name


def test_every_method_name_builds_a_pruner():
    from ebft_engine.pruners import make_pruner

    for name in registry.method_names():
        pruner = make_pruner(name, PruneConfig(method=name))
        assert pruner.name == name and isinstance(pruner.structured, bool), name
        assert pruner.needs <= set(STAT_FIELDS), (name, sorted(pruner.needs))
        assert callable(pruner.allocate) and callable(pruner.prune), name


def test_every_recovery_entry_builds():
    entries = registry.recovery_entries()
    assert entries, "no recovery registered"
    for entry in entries:
        assert entry.description.strip(), f"recovery {entry.name} has no description"
        recovery = entry.build()
        # the run labels the variant with the recovery's own name and reports what labels() says
        assert recovery.name == entry.name, (recovery.name, entry.name)
        assert tuple(recovery.labels(recovery.name)) == (entry.labels or (entry.name,)), entry.name
        assert recovery.phase in ("ebft", "prune") and isinstance(recovery.trains, bool), entry.name
        for method in ("active", "begin", "targets", "diverges", "recover", "after"):
            assert callable(getattr(recovery, method, None)), f"recovery {entry.name} has no {method}"


# ---- the proof: a method and a recovery, each one new file --------------------------------------------------
def _unique_name(package: str) -> str:
    """A module name no one else has: not starting with _ (discovery skips those), a fresh random part."""
    while True:
        name = f"zz_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        if not (ROOT / "ebft_engine" / package / f"{name}.py").exists():
            return name


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m ebft_engine ...`` in a fresh process (so the package's discovery sees the new file), from this
    checkout, writing no bytecode next to the throwaway file; ``--help`` unwrapped (argparse breaks at hyphens)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "10000"}
    return subprocess.run([sys.executable, "-m", "ebft_engine", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _run_args(tmp_path: Path, text_files) -> list[str]:
    calib, evaluation = text_files
    return ["run", "--model", "tiny-random", "--calib", f"file:{calib}", "--nsamples", "4", "--seqlen", "32",
            "--eval", f"file:{evaluation}", "--eval-seqlen", "64", "--eval-windows", "2", "--batch-size", "4",
            "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--json-out", str(tmp_path / "summary.json")]


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        cached.unlink(missing_ok=True)


PROBE_METHOD = '''"""A throwaway mask method written by tests/test_conformance.py (removed when the test ends)."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import option
from .patterns import lowest_per_row
from .registry import MaskResult, register


@dataclass(frozen=True)
class ProbeOptions:
    {name}_share: float = option(1.0, "the share of --sparsity this probe removes (conformance test)", minimum=0)


@register("{name}", description="largest |W| per row (conformance probe)", options=ProbeOptions)
def probe(weight, stats, sparsity, nm, cfg=None, **_):
    return MaskResult(lowest_per_row(weight.abs().float(), sparsity * cfg.{name}_share))
'''


def test_a_new_mask_method_is_one_file(tmp_path, text_files):
    name = _unique_name("sparsity")
    path = ROOT / "ebft_engine" / "sparsity" / f"{name}.py"
    flag = f"--{name.replace('_', '-')}-share"
    try:
        with path.open("x") as f:  # never overwrite
            f.write(PROBE_METHOD.format(name=name))
        helped = _cli("run", "--help")
        assert helped.returncode == 0, helped.stderr
        assert flag in helped.stdout and name in helped.stdout, helped.stdout
        done = _cli(*_run_args(tmp_path, text_files), "--method", name, "--sparsity", "0.5", "--epochs", "0",
                    flag, "0.5")
    finally:
        _remove(path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert set(summary["ppl"]) == {"dense", name}
    # per row, int(cols * 0.5 * 0.5) of every row: a quarter exactly (the option took effect)
    assert summary["actual_sparsity"][name] == pytest.approx(0.25, abs=1e-12)
    config = json.loads(next((tmp_path / "runs").iterdir()).joinpath("config.json").read_text())
    assert config["prune"]["method"] == name and config["prune"][f"{name}_share"] == 0.5


PROBE_RECOVERY = '''"""A throwaway recovery written by tests/test_conformance.py (removed when the test ends)."""
from __future__ import annotations

from ..events import Notice
from ..registry import RecoveryEntry, add_recovery
from .base import PruneOnly

NAME = "{name}"


class Probe(PruneOnly):
    """Trains nothing; counts the blocks the loop gave it and says so before its evaluation."""

    name = NAME

    def __init__(self):
        self.blocks = []

    def labels(self, label):
        return (NAME,)

    def recover(self, run, block, index, stream, targets, masks, trains):
        self.blocks.append(index)
        return (yield from super().recover(run, block, index, stream, targets, masks, trains))

    def after(self, run, label):
        yield Notice("info", f"{{NAME}} recovered blocks {{self.blocks}}")
        yield from super().after(run, label)


add_recovery(RecoveryEntry(NAME, "a throwaway recovery (conformance probe)", Probe, labels=(NAME,)))
'''


def test_a_new_recovery_is_one_file(tmp_path, text_files):
    module = _unique_name("recoveries")
    name = module.replace("_", "-")
    path = ROOT / "ebft_engine" / "recoveries" / f"{module}.py"
    try:
        with path.open("x") as f:
            f.write(PROBE_RECOVERY.format(name=name))
        helped = _cli("run", "--help")
        assert helped.returncode == 0, helped.stderr
        assert f"{name} (a throwaway recovery" in helped.stdout, helped.stdout  # --recoveries lists it
        done = _cli(*_run_args(tmp_path, text_files), "--method", "wanda", "--sparsity", "0.5",
                    "--recoveries", name)
    finally:
        _remove(path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"[info] {name} recovered blocks [0, 1, 2, 3]" in done.stdout, done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert set(summary["ppl"]) == {"dense", name}
    assert summary["actual_sparsity"][name] == pytest.approx(0.5)
    assert f"| {name} |" in done.stdout
