"""One adapter per architecture family, found by model_type; the shapes a config states, the shapes the built
model has and the surgery structured pruning does all come from that adapter."""
from __future__ import annotations

import pytest
import torch

from ebft_engine.errors import ModelLoadError
from ebft_engine.models import (SUPPORTED_TYPES, BlockAdapter, LlamaAdapter, adapter_for, adapter_for_block,
                                adapter_for_config, check_architecture, config_counts, count_params,
                                projection_shapes)
from ebft_engine.planner import Shape

FAMILY = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def _build(kind: str, **overrides):
    import transformers

    config_cls, model_cls = FAMILY[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides})
    config._attn_implementation = "sdpa"
    return getattr(transformers, model_cls)(config).eval().requires_grad_(False)


def _built_shapes(adapter, block) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in adapter.linears(block).items()}


def test_every_supported_type_has_its_adapter_and_others_are_refused_by_name():
    assert set(SUPPORTED_TYPES) == set(FAMILY)
    for kind in FAMILY:
        assert adapter_for_config(_build(kind).config) is LlamaAdapter
    from transformers import GPT2Config

    for check in (adapter_for_config, check_architecture):
        with pytest.raises(ModelLoadError, match=r"'gpt2' is not supported; EBFT Lab supports the LLaMA family "
                                                 r"\(llama, mistral, qwen2, qwen3\)"):
            check(GPT2Config())


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("mistral", {"head_dim": 24}), ("qwen2", {}),
                                            ("qwen3", {"head_dim": 24})],
                         ids=["llama", "mistral-head_dim", "qwen2", "qwen3-head_dim"])
def test_the_config_shapes_are_the_built_model_shapes(kind, overrides):
    """projection_shapes (the one home of the arithmetic) states what transformers builds, head_dim included;
    count_params and the planner's Shape add up from it."""
    model = _build(kind, **overrides)
    adapter = adapter_for(model)
    assert isinstance(adapter, BlockAdapter) and isinstance(adapter, LlamaAdapter)
    assert adapter_for_block(adapter.blocks[0]) is LlamaAdapter
    for block in adapter.blocks:
        assert _built_shapes(adapter, block) == projection_shapes(model.config)
        assert adapter.counts(block) == config_counts(model.config)
    shape = Shape.of(model.config)
    assert shape.params == count_params(model.config)
    assert (shape.kv, shape.intermediate) == (projection_shapes(model.config)["k_proj"][1], 96)
    real = sum(p.numel() for p in model.parameters())
    small = sum(p.numel() for n, p in model.named_parameters() if "bias" in n or "q_norm" in n or "k_norm" in n)
    assert count_params(model.config) == real - small  # biases and q/k norms: too few to count


@pytest.mark.parametrize("kind", list(FAMILY))
def test_surgery_through_the_adapter_gives_the_shapes_the_counts_state(kind):
    """Shrinking a block to counts gives it projection_shapes(config, counts); regrowing gives the dense ones."""
    model = _build(kind)
    family = adapter_for_config(model.config)
    block = family.layers(model)[0]
    counts = {"heads": 2, "kv_heads": 2, "channels": 40}
    family.shrink(block, family.first_n(block, counts))
    assert family.counts(block) == counts
    assert _built_shapes(family, block) == projection_shapes(model.config, counts)
    assert block.self_attn.num_key_value_groups == 1
    assert family.regrow(block, model.config) is True
    assert _built_shapes(family, block) == projection_shapes(model.config)
    assert block.self_attn.num_key_value_groups == 2 and family.regrow(block, model.config) is False


def test_a_block_of_no_supported_family_is_refused():
    with pytest.raises(ModelLoadError, match="belongs to no supported family"):
        adapter_for_block(torch.nn.Linear(2, 2))
