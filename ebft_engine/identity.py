"""Which model a run was started on, recorded in its folder (``model.json``) so that ``--resume`` refuses a model
that changed since: a folder rebuilt with more blocks, or the same shapes with new weights, would otherwise be
resumed silently and the finished blocks of one model mixed with the rest of another.

The identity is cheap for a 7B model and survives a copy of the files (an mtime does not):

- the config as a dict, less the keys that say nothing about the weights (its path, the transformers version,
  output switches), kept whole so a refusal can say what changed (``num_hidden_layers: 4 then, 6 now``);
- a digest of each file that decides the numbers: the weights (safetensors, bin, pt, GGUF), ebft_structure.json
  and the tokenizer's vocabulary. A file up to 16 MiB is hashed whole; a larger one by its size, its first and
  last MiB (a safetensors header names every tensor's shape and offset) and 1024 pages of 4 KiB spread evenly
  between them: every tensor larger than a 1024th of its file is read in part (LLaMA-7B's smallest projection is
  32 MiB, a page is read every 10 MiB of a 10 GB shard), about 6 MiB per file in all;
- for a hub id, the commit of the local snapshot and its files; for a GGUF, that file; for tiny-random, the
  config alone (its weights come from a fixed seed).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .models import STRUCTURE_FILE, TINY_NAME, ModelSource, _local_folder
from .record import to_json, write_json_atomic

IDENTITY_FILE = "model.json"
FORMAT = 1
# Config keys that do not change what the model computes: where it was read from, which library wrote it, what
# a forward pass returns.
VOLATILE_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "output_attentions",
                           "output_hidden_states", "return_dict", "use_cache", "attn_implementation",
                           "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
WHOLE = 16 * 1024 ** 2  # files up to this size are hashed whole
EDGE = 1024 ** 2  # first and last bytes always read
PAGES, PAGE = 1024, 4096  # pages sampled between them


def file_digest(path: Path) -> str:
    """A digest of one file's size and contents (sampled above WHOLE bytes; see the module docstring)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}|".encode())
    with open(path, "rb") as f:
        if size <= WHOLE:
            for chunk in iter(lambda: f.read(EDGE), b""):
                h.update(chunk)
        else:
            h.update(f.read(EDGE))
            span = size - 2 * EDGE
            for k in range(PAGES):
                f.seek(EDGE + span * k // PAGES)
                h.update(f.read(PAGE))
            f.seek(size - EDGE)
            h.update(f.read(EDGE))
    return h.hexdigest()[:32]


def _config_dict(model_config) -> dict[str, Any]:
    data = {k: v for k, v in model_config.to_dict().items() if k not in VOLATILE_KEYS}
    return json.loads(to_json(data, sort_keys=True))  # as it reads back from model.json


def _files(source: ModelSource) -> tuple[dict[str, str] | None, str | None]:
    """(file name -> digest, hub snapshot commit) of the files behind ``source``; (None, None) when they are not
    on this machine (a hub id not downloaded yet)."""
    if source.path == TINY_NAME:
        return {}, None
    if source.gguf_file:
        path = Path(source.path) / source.gguf_file
        return {source.gguf_file: file_digest(path)}, None
    folder = _local_folder(source)
    if folder is None:
        return None, None
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and (
        p.name.endswith(WEIGHT_SUFFIXES) or p.name in VOCAB_FILES or p.name == STRUCTURE_FILE))
    snapshot = None if Path(source.path).is_dir() else folder.name  # a hub snapshot is named by its commit
    return {name: file_digest(folder / name) for name in names}, snapshot


def model_identity(source: ModelSource, model_config) -> dict[str, Any]:
    """The identity of the model behind ``source`` (see the module docstring)."""
    files, snapshot = _files(source)
    return {"format": FORMAT, "model": source.spec, "config": _config_dict(model_config), "files": files,
            "snapshot": snapshot}


def write_identity(run_dir: str | Path, identity: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / IDENTITY_FILE, identity)


def read_identity(run_dir: str | Path) -> dict[str, Any] | None:
    """The identity a run folder recorded when its run started; None for a folder from before it was kept."""
    try:
        data = json.loads((Path(run_dir) / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two identities, in words; empty when they are the same model. Files are compared
    only when both sides could read them."""
    return _config_changes(recorded, current) + _snapshot_change(recorded, current) + _file_changes(recorded, current)


def _config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The first three config fields that differ, then how many more."""
    old, new = recorded.get("config") or {}, current.get("config") or {}
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    out = [f"{k}: {json.dumps(old.get(k))} then, {json.dumps(new.get(k))} now" for k in keys[:3]]
    if len(keys) > 3:
        out.append(f"{len(keys) - 3} more config fields")
    return out


def _snapshot_change(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    if recorded.get("snapshot") and current.get("snapshot") and recorded["snapshot"] != current["snapshot"]:
        return [f"hub snapshot {recorded['snapshot'][:12]} then, {current['snapshot'][:12]} now"]
    return []


def _file_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The first four files that differ (new, gone or changed), then how many more; none unless both sides read
    their files."""
    files_then, files_now = recorded.get("files"), current.get("files")
    if files_then is None or files_now is None or files_then == files_now:
        return []
    differ = sorted(n for n in set(files_then) | set(files_now) if files_then.get(n) != files_now.get(n))
    return ["its files differ: " + ", ".join(
        n + (" (new)" if n not in files_then else " (gone)" if n not in files_now else "") for n in differ[:4]) +
            (f" and {len(differ) - 4} more" if len(differ) > 4 else "")]


def check_same_model(run_dir: str | Path, current: dict[str, Any]) -> None:
    """Raise ConfigError on ``model`` when the run in ``run_dir`` was started on another model than ``current``."""
    recorded = read_identity(run_dir)
    if recorded is None:
        return
    diff = changes(recorded, current)
    if diff:
        raise ConfigError("model", f"{current.get('model')} changed since run {Path(run_dir).name} started "
                          f"({'; '.join(diff)}), and resuming would mix the finished blocks of one model with "
                          "the rest of another", "start a new run on it, or put the original model back to resume")
