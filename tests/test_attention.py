"""Grouped-query attention before sm80 (models/attention.py): blocks repeat their key/value heads so SDPA's
memory-efficient kernel can run; the result is transformers' SDPA attention exactly, and the plan counts it."""
from __future__ import annotations

import io
import types

import pytest
import torch

from ebft_engine.cli import main
from ebft_engine.config import RunConfig
from ebft_engine.device import Precision
from ebft_engine.models import LlamaAdapter
from ebft_engine.models.attention import REPEAT_KV, attention_for, register, repeats_kv
from ebft_engine.planner import plan_memory
from tests.test_fidelity import SEQ, WINDOW, build

FAMILIES = [("llama", {}), ("mistral", {"sliding_window": WINDOW}), ("qwen3", {"head_dim": 24}),
            ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1})]


def _sdpa_calls(monkeypatch) -> list[dict]:
    """Record the head counts and keyword arguments of every SDPA call (then run it)."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append({"q_heads": query.shape[1], "kv_heads": key.shape[1], **kwargs})
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_repeated_key_value_heads_give_sdpas_logits_and_blocks_exactly(family, overrides, monkeypatch):
    model = build(family, overrides)
    ids = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    adapter = LlamaAdapter(model)
    kwargs = adapter.block_kwargs(SEQ, torch.device("cpu"), torch.float32)
    x = adapter.embed(ids)
    with torch.no_grad():
        plain = [adapter.call_block(block, x, kwargs) for block in adapter.blocks]
    register()
    model.config._attn_implementation = REPEAT_KV
    LlamaAdapter(model)  # the adapter keeps the choice (it only replaces what is neither SDPA variant)
    assert model.config._attn_implementation == REPEAT_KV
    calls = _sdpa_calls(monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
        kwargs = adapter.block_kwargs(SEQ, torch.device("cpu"), torch.float32)
        repeated = [adapter.call_block(block, x, kwargs) for block in adapter.blocks]
    assert torch.equal(got, expected)
    for a, b in zip(plain, repeated):
        assert torch.equal(a, b)
    assert calls and all(c["q_heads"] == c["kv_heads"] and not c.get("enable_gqa") for c in calls)


def test_plain_sdpa_would_have_passed_enable_gqa(monkeypatch):
    """The defect the repeat avoids: without a padding mask transformers hands SDPA the grouped heads with
    enable_gqa, which only the flash kernel takes (none before sm80)."""
    model = build("llama", {})
    calls = _sdpa_calls(monkeypatch)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    assert any(c["q_heads"] != c["kv_heads"] and c.get("enable_gqa") for c in calls)


def test_the_repeat_is_chosen_for_grouped_query_models_before_sm80_only():
    gqa = types.SimpleNamespace(num_attention_heads=32, num_key_value_heads=8)
    mha = types.SimpleNamespace(num_attention_heads=32, num_key_value_heads=32)
    assert repeats_kv(gqa, (7, 5)) and repeats_kv(gqa, (7, 0))
    assert not repeats_kv(gqa, (8, 0)) and not repeats_kv(gqa, (9, 0)) and not repeats_kv(gqa, None)
    assert not repeats_kv(mha, (7, 5))
    assert attention_for(gqa, torch.device("cpu")) == "sdpa"


def test_the_plan_counts_the_repeated_keys_and_values():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    cfg = RunConfig.from_dict({"model": "tiny-random", "prune": {"sparsity": 0.5}})
    p = Precision(torch.device("cuda"), torch.float16, torch.float16)
    before, after = (plan_memory(config, cfg, p, capability=c, activations="device") for c in ((8, 0), (7, 5)))
    tokens = cfg.ebft.batch_size * cfg.calib.seqlen
    # what SDPA keeps for backward: keys and values at the query width (4096), 2 bytes each
    assert after.phase("ebft").device - before.phase("ebft").device == tokens * 4 * 4096
    mha = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    assert (plan_memory(mha, cfg, p, capability=(7, 5)).phases == plan_memory(mha, cfg, p, capability=(8, 0)).phases)


def test_the_plan_command_names_the_kernel_on_a_t4():
    out = io.StringIO()
    code = main(["plan", "--config", "assets/presets/llama-7b-paper.yaml", "--gpu", "t4", "--model",
                 "meta-llama/Meta-Llama-3-8B"], out=out)
    text = out.getvalue()
    assert code == 0 and "attention kernel: memory-efficient, on key/value heads repeated" in text
    assert "math" not in text
