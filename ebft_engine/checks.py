"""Checks that need the model's config but no weight: run before a run folder exists (``preflight``) and again
when the model is loaded, so a setting the model rules out is refused in one line naming the field."""
from __future__ import annotations

import math

from .config import RunConfig
from .data import read_text_file
from .device import pick_device
from .errors import ConfigError
from .models import load_config, read_structure, resolve_source
from .sparsity import structured as st

DEFAULT_EVAL_SEQLEN_CAP = 2048


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
    widths = _input_widths(model_config, structure)
    bad = _misfits(widths, m, heads, hd)
    if not bad:
        return
    n = model_config.num_hidden_layers
    raise ConfigError("prune.pattern", f"{pattern} groups every {m} input columns of a layer, and "
                      f"{'; '.join(_where(*key, names, n) for key, names in bad.items())}, not a multiple of {m}",
                      _nm_fix(widths))


def _input_widths(model_config, structure: list | None) -> dict[tuple[str, int], list[int]]:
    """(layer, input width) -> the blocks where that layer reads that many columns."""
    widths: dict[tuple[str, int], list[int]] = {}
    for i in range(model_config.num_hidden_layers):
        counts = structure[i] if structure and i < len(structure) and isinstance(structure[i], dict) else None
        for name, (n_in, _out) in st.dense_shapes(model_config, counts).items():
            widths.setdefault((name, n_in), []).append(i)
    return widths


def _misfits(widths: dict[tuple[str, int], list[int]], m: int, heads: int,
             hd: int) -> dict[tuple[int, tuple[int, ...], str], list[str]]:
    """(width, blocks, why) -> the layers reading a width that is not a multiple of ``m`` (``why``: o_proj's
    width as heads x head_dim)."""
    bad: dict[tuple[int, tuple[int, ...], str], list[str]] = {}
    for (name, n_in), blocks in widths.items():
        if n_in % m:
            why = f" ({heads} heads x head_dim {hd})" if name == "o_proj" and n_in == heads * hd else ""
            bad.setdefault((n_in, tuple(blocks), why), []).append(name)
    return bad


def _where(n_in: int, blocks: tuple[int, ...], why: str, names: list[str], n_blocks: int) -> str:
    scope = "" if len(blocks) == n_blocks else \
        f" in block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}"
    return f"{', '.join(names)} read{'s' if len(names) == 1 else ''} {n_in} columns{why}{scope}"


def _nm_fix(widths: dict[tuple[str, int], list[int]]) -> str:
    """An N:M pattern that fits every layer's width (2:4 or 4:8 where one does), else unstructured."""
    divisor = math.gcd(*(n_in for (_name, n_in) in widths))
    fits = [p for p in ("2:4", "4:8") if divisor % int(p.split(":")[1]) == 0]
    return (f"use an N:M pattern whose M divides every layer's width (all are multiples of {divisor})"
            f"{', such as ' + fits[0] if fits else ''}, or --pattern unstructured") if divisor > 1 else \
        "no N:M pattern divides every layer's width; use --pattern unstructured"
