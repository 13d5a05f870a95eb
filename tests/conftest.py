"""Fixtures: a tiny random LLaMA built in-process (fast), and SmolLM2 loaded once per session (slow tests)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ebft_engine.models import byte_tokenizer  # noqa: F401  (tests import it from here)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Text for tiny-model runs: calibration and evaluation come from different passages.
CALIB_TEXT = ("The quick brown fox jumps over the lazy dog while the sun sets behind the hills. " * 60)
EVAL_TEXT = ("Pack my box with five dozen liquor jugs, said the baker to the busy clerk at noon. " * 60)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    if "EBFT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("EBFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, attn_implementation="sdpa")


@pytest.fixture
def tiny_llama(tiny_llama_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config).eval()


@pytest.fixture
def calib_tokens():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama):
    """The tiny LLaMA saved as a local folder, with its tokenizer, as users would point --model at."""
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_files(tmp_path):
    calib, evaluation = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(CALIB_TEXT)
    evaluation.write_text(EVAL_TEXT)
    return calib, evaluation


@pytest.fixture
def tiny_run_config(tiny_model_dir, text_files, tmp_path):
    from ebft_engine import RunConfig

    calib, evaluation = text_files
    return RunConfig.from_dict({
        "model": str(tiny_model_dir),
        "prune": {"method": "wanda", "sparsity": 0.5},
        "calib": {"source": f"file:{calib}", "nsamples": 8, "seqlen": 32},
        "ebft": {"epochs": 4, "lr": 1e-3, "batch_size": 4},
        "eval": {"source": f"file:{evaluation}", "seqlen": 64, "windows": 4},
        "device": "cpu", "runs_dir": str(tmp_path / "runs"),
    })
