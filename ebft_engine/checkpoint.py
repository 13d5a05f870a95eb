"""Per-block checkpoints: what ``--resume`` needs to continue a killed run where it stopped.

After each block of a pruned variant the block's weights go to ``<run>/checkpoint/<label>/block-NNNN.pt`` and
``checkpoint/state.json`` records how many blocks of which variant are done. Matrices are stored as a packed
bit mask of their nonzero entries plus those entries' values (exact, and at 70% sparsity about a third of the
dense bytes); other tensors as they are. Nothing else is needed to resume, because:

- the propagated calibration activations are recomputed by running the embeddings through the restored
  blocks (the same batched forward the run itself used, so the same numbers);
- each block's training starts from a fresh optimiser and a generator seeded from (seed, block index), so
  there is no optimiser or RNG state to carry across blocks;
- finished perplexities, per-block losses and phase times are in summary.json, written after every block.

Every file is written to a temporary name and renamed: a kill leaves either the old file or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.json"
STRUCTURE_KEY = "_structure"  # in a block file: the heads and channels a structurally pruned block kept
FORMAT = 1


def pack(tensor: torch.Tensor) -> dict[str, Any]:
    """A matrix as (packed nonzero mask, nonzero values); other tensors unchanged."""
    t = tensor.detach().cpu()
    if t.ndim != 2:
        return {"dense": t.clone()}
    mask = t != 0
    return {"shape": tuple(t.shape), "bits": torch.from_numpy(np.packbits(mask.numpy().reshape(-1))),
            "values": t[mask].clone()}


def unpack(entry: dict[str, Any]) -> torch.Tensor:
    if "dense" in entry:
        return entry["dense"]
    shape, values = entry["shape"], entry["values"]
    count = shape[0] * shape[1]
    mask = torch.from_numpy(np.unpackbits(entry["bits"].numpy(), count=count).astype(bool)).reshape(shape)
    out = torch.zeros(shape, dtype=values.dtype)
    out[mask] = values
    return out


def mask_digest_update(hasher, linears: dict[str, nn.Linear], kept: dict[str, list[int]] | None = None) -> None:
    """Feed a block's sparsity masks (which weights are zero) into a running sha256, and for a structurally
    pruned block which heads and channels it kept."""
    if kept is not None:
        hasher.update(json.dumps(kept, sort_keys=True).encode())
    for name, linear in linears.items():
        mask = (linear.weight.detach() != 0).cpu().numpy().reshape(-1)
        hasher.update(name.encode())
        hasher.update(np.packbits(mask).tobytes())


def new_digest():
    return hashlib.sha256()


class Checkpoints:
    """The ``checkpoint/`` folder of one run."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "checkpoint"

    def state(self) -> dict[str, Any] | None:
        """{"label": variant, "done": blocks finished} of the variant in progress, or None."""
        try:
            state = json.loads((self.dir / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return None
        return state

    def done(self, label: str) -> int:
        """How many leading blocks of ``label`` can be restored."""
        state = self.state()
        if not state or state.get("label") != label:
            return 0
        done = int(state.get("done", 0))
        while done > 0 and not self._path(label, done - 1).is_file():  # never trust a count without its files
            done -= 1
        return done

    def start(self, label: str) -> None:
        """A variant starts from block 0: drop every other checkpoint (only one variant's blocks are kept)."""
        self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_state({"format": FORMAT, "label": label, "done": 0})

    def save(self, label: str, index: int, block: nn.Module, structure: dict[str, list[int]] | None = None) -> None:
        """Write one finished block; ``structure``: the heads and channels a structurally pruned block kept."""
        path = self._path(label, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {name: pack(t) for name, t in block.state_dict().items()}
        if structure is not None:
            data[STRUCTURE_KEY] = structure
        tmp = path.with_name(path.name + ".tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
        self._write_state({"format": FORMAT, "label": label, "done": index + 1})

    def load(self, label: str, index: int, block: nn.Module) -> dict[str, list[int]] | None:
        """Put a saved block back (first giving it the saved structure, if it was structurally pruned); return
        that structure."""
        data = torch.load(self._path(label, index), map_location="cpu", weights_only=True)
        structure = data.pop(STRUCTURE_KEY, None)
        if structure is not None:
            from .models import BlockStructure, adapter_for_block

            adapter_for_block(block).shrink(block, BlockStructure.from_dict(structure))
        state = {name: unpack(entry) for name, entry in data.items()}
        with torch.no_grad():
            for name, tensor in block.state_dict().items():
                tensor.copy_(state[name].to(tensor.dtype))
        return structure

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, label: str, index: int) -> Path:
        return self.dir / label / f"block-{index:04d}.pt"

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self.dir / STATE_FILE)


def estimate_bytes(block_params: int, element_bytes: int, sparsity: float) -> int:
    """Disk one variant's checkpoints take: the kept values plus one bit per weight."""
    return int(block_params * ((1 - sparsity) * element_bytes + 1 / 8))
