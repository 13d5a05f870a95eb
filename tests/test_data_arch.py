"""Data sources fail with messages that offer a way out; every LLaMA-family architecture runs block by block."""
from __future__ import annotations

import re

import pytest
import torch

from ebft_engine import data
from ebft_engine.errors import ConfigError, DataError
from ebft_engine.models import LlamaAdapter
from conftest import byte_tokenizer


def test_missing_and_empty_files(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(DataError, match="calib.source: file .* does not exist"):
        data.calibration_tokens(tok, f"file:{tmp_path / 'nope.txt'}", 4, 16, 0)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="eval.source: file .* is empty"):
        data.evaluation_tokens(tok, f"file:{tmp_path / 'empty.txt'}", 16)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="calib.seqlen: .* has 4 tokens"):
        data.calibration_tokens(tok, f"file:{tmp_path / 'short.txt'}", 4, 16, 0)


HUB_FAILURES = [("calib.source", "c4"), ("calib.source", "wikitext2"), ("eval.source", "wikitext2"),
                ("eval.source", "c4"), ("eval.source", "ptb")]


@pytest.mark.parametrize("field,source", HUB_FAILURES, ids=[f"{f}={s}" for f, s in HUB_FAILURES])
def test_hub_unreachable_offers_only_values_its_field_accepts(monkeypatch, tmp_path, field, source):
    """The way out a hub failure offers must be a value of that same field: --eval ptb offline was told to use
    'self', which --eval refuses (it is calibration text only)."""
    from ebft_engine import RunConfig
    from ebft_engine.config import CALIB_SOURCES, EVAL_SOURCES

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(data, "_load_dataset", offline)
    with pytest.raises(DataError) as info:
        if field == "calib.source":
            data.calibration_tokens(byte_tokenizer(), source, 4, 16, 0)
        else:
            data.evaluation_tokens(byte_tokenizer(), source, 16)
    message = str(info.value)
    assert message.startswith(f"{field}: could not load ") and "Failed to resolve" in message
    hint = message.split("Offline, use ", 1)[1]
    words = sorted(set(CALIB_SOURCES) | set(EVAL_SOURCES))
    offered = re.findall(r"file:PATH|\b(?:" + "|".join(words) + r")\b", hint)
    assert "file:PATH" in offered
    for value in offered:  # each offered value passes the field's own validation
        RunConfig().with_overrides({field: value.replace("PATH", str(tmp_path / "text.txt"))})
    assert ("self" in offered) == (field == "calib.source")
    with pytest.raises(ConfigError):  # and the one it used to offer is indeed refused there
        RunConfig().with_overrides({"eval.source": "self"})


def test_file_windows_are_seeded_and_in_range(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 20)
    tok = byte_tokenizer()
    a = data.calibration_tokens(tok, f"file:{tmp_path / 't.txt'}", 5, 16, seed=3)
    b = data.calibration_tokens(tok, f"file:{tmp_path / 't.txt'}", 5, 16, seed=3)
    c = data.calibration_tokens(tok, f"file:{tmp_path / 't.txt'}", 5, 16, seed=4)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_self_generated_calibration_is_cached_and_deterministic(tiny_llama):
    tok = byte_tokenizer()
    a = data.calibration_tokens(tok, "self", 3, 12, seed=0, model=tiny_llama)
    assert a.shape == (3, 12)
    assert data.self_cache_path(tiny_llama, 3, 12, 0).is_file()
    b = data.self_generated(tiny_llama, tok, 3, 12, 0, data.Precision(torch.device("cpu"), torch.float32, None))
    assert torch.equal(a, b)
    assert tok.eos_token_id not in a[:, 1:].tolist()  # generation never stops early


def _tiny(kind: str):
    import transformers

    common = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                             "llama": ("LlamaConfig", "LlamaForCausalLM")}[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**common)
    config._attn_implementation = "sdpa"
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_each_family_reproduces_its_logits_block_by_block(kind):
    model = _tiny(kind)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    adapter = LlamaAdapter(model)
    with torch.no_grad():
        hidden = adapter.embed(ids)
        kwargs = adapter.block_kwargs(24, torch.device("cpu"), torch.float32)
        for block in adapter.blocks:
            hidden = adapter.call_block(block, hidden, kwargs)
        torch.testing.assert_close(adapter.head(hidden), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert set(adapter.linears(adapter.blocks[0])) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}
