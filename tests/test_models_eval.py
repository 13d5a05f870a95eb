"""The adapter reproduces the model; perplexity follows the protocol; loading errors are clear."""
from __future__ import annotations

import math

import pytest
import torch

from ebft_engine.device import Precision
from ebft_engine.errors import ModelLoadError
from ebft_engine.evaluate import eval_windows, perplexity
from ebft_engine.models import LlamaAdapter, resolve_source

FP32_CPU = Precision(torch.device("cpu"), torch.float32, None)


def test_block_by_block_forward_reproduces_logits(tiny_llama, calib_tokens):
    adapter = LlamaAdapter(tiny_llama)
    with torch.no_grad():
        expected = tiny_llama(calib_tokens).logits
        hidden = adapter.embed(calib_tokens)
        kwargs = adapter.block_kwargs(calib_tokens.shape[1], torch.device("cpu"), torch.float32)
        for block in adapter.blocks:
            hidden = adapter.call_block(block, hidden, kwargs)
        logits = adapter.head(hidden)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_block_forward_is_causal(tiny_llama, calib_tokens):
    """Changing a later token must not change earlier outputs (attention_mask=None must mean causal)."""
    adapter = LlamaAdapter(tiny_llama)
    other = calib_tokens.clone()
    other[:, -1] = (other[:, -1] + 1) % 256
    kwargs = adapter.block_kwargs(calib_tokens.shape[1], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        a = adapter.call_block(adapter.blocks[0], adapter.embed(calib_tokens), kwargs)
        b = adapter.call_block(adapter.blocks[0], adapter.embed(other), kwargs)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


def test_perplexity_equals_exp_of_hf_mean_loss(tiny_llama):
    ids = torch.randint(0, 256, (1, 5 * 48 + 7), generator=torch.Generator().manual_seed(3))
    windows, total = eval_windows(ids, 48, None)
    assert total == 5 and windows.shape == (5, 48)  # the 7-token tail is dropped
    with torch.no_grad():
        losses = [tiny_llama(w[None], labels=w[None]).loss.item() for w in windows]
    result = perplexity(LlamaAdapter(tiny_llama), ids, 48, FP32_CPU, batch_size=2)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert not result.partial and result.tokens == 5 * 48


def test_partial_evaluation_uses_first_windows(tiny_llama):
    ids = torch.randint(0, 256, (1, 4 * 32), generator=torch.Generator().manual_seed(4))
    full = perplexity(LlamaAdapter(tiny_llama), ids[:, :64], 32, FP32_CPU)
    part = perplexity(LlamaAdapter(tiny_llama), ids, 32, FP32_CPU, windows=2)
    assert part.partial and part.windows == 2 and part.total_windows == 4
    assert part.ppl == pytest.approx(full.ppl, rel=1e-6)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    from ebft_engine.models import load_config

    with pytest.raises(ModelLoadError, match="'gpt2' is not supported.*llama"):
        load_config(resolve_source(str(tmp_path / "gpt2")))


def test_missing_model_paths_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))


@pytest.mark.parametrize("reason", ["and couldn't find them in the cached files.", "no such file", ""])
def test_a_model_load_failure_is_one_sentence_with_one_full_stop(reason):
    """huggingface_hub's offline message ends with its own period: "cached files.. Check the hub id" read badly."""
    from ebft_engine.models.loading import _load_failure, resolve_source

    text = _load_failure(resolve_source("nobody/nothing"), OSError(reason) if reason else OSError())
    assert ".." not in text
    assert text.startswith(f"model: could not load nobody/nothing: {reason.rstrip('.') or 'OSError'}. Check the hub id")
