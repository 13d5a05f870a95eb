"""Block-by-block execution computes what the model's own forward computes, for every option the adapter accepts.

One tiny config per option and per family (sliding windows, every rope type transformers offers for these
families, attention and MLP biases, q/k norms, tied embeddings, head_dim != hidden / heads), always with
sequences longer than any window, in float32 with a tight tolerance:
- evaluation: the adapter's logits and :func:`perplexity` equal the model's own;
- calibration: each block's output, called as the pipeline calls it, equals the output that block gives inside
  the model's forward (captured by hooks), at the calibration length and batch;
- EBFT training: the same holds with the block in training mode and gradients on, as the trainer calls it.
The README lists these options; a config the engine cannot reproduce is refused at load, naming the option.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from ebft_engine.device import Precision
from ebft_engine.errors import ModelLoadError
from ebft_engine.evaluate import perplexity
from ebft_engine.models import LlamaAdapter

FP32_CPU = Precision(torch.device("cpu"), torch.float32, None)
SEQ = 48  # longer than every window below (16), shorter than every context (64)
WINDOW = 16
COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
HALF = 8  # head_dim 16 -> 8 rotary frequencies (longrope's factors are per frequency)

# (family, option name as the README lists it, config overrides)
MATRIX = [
    ("llama", "causal", {}),
    ("llama", "rope linear", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", "rope dynamic", {"max_position_embeddings": 32,  # SEQ goes past it: the NTK update kicks in
                               "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", "rope yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 16}}),
    ("llama", "rope longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 32, "factor": 2.0,
                                                    "short_factor": [1.0 + i / 10 for i in range(HALF)],
                                                    "long_factor": [2.0 + i / 5 for i in range(HALF)]}}),
    ("llama", "rope llama3", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}}),
    ("llama", "attention and MLP biases", {"attention_bias": True, "mlp_bias": True}),
    ("llama", "tied embeddings", {"tie_word_embeddings": True}),
    ("llama", "head_dim != hidden / heads", {"head_dim": 24}),
    ("mistral", "sliding window", {"sliding_window": WINDOW}),
    ("mistral", "sliding window, head_dim != hidden / heads", {"sliding_window": WINDOW, "head_dim": 24}),
    ("qwen2", "causal, qkv biases", {}),
    ("qwen2", "sliding window from max_window_layers", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                        "max_window_layers": 1}),
    ("qwen2", "sliding window from layer_types", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                  "layer_types": ["sliding_attention", "full_attention",
                                                                  "sliding_attention"]}),
    ("qwen2", "tied embeddings", {"tie_word_embeddings": True}),
    ("qwen3", "q/k norms, head_dim != hidden / heads", {"head_dim": 24}),
    ("qwen3", "sliding window from max_window_layers", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                        "max_window_layers": 2}),
    ("qwen3", "rope yarn, attention bias", {"attention_bias": True,
                                            "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                "rope_theta": 10000.0,
                                                                "original_max_position_embeddings": 16}}),
]
IDS = [f"{family}: {option}" for family, option, _ in MATRIX]


def build(family: str, overrides: dict):
    config_cls, model_cls = CLASSES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random init is near zero: make attention sharp enough that a lost mask shows
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def own_block_io(model, ids):
    """(inputs, outputs) of every block inside the model's own forward."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(
        i, (a[0].detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone())))
        for i, block in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, [seen[i] for i in range(len(model.model.layers))]


@pytest.mark.parametrize("family,option,overrides", MATRIX, ids=IDS)
def test_evaluation_reproduces_the_models_own_logits_and_perplexity(family, option, overrides):
    model = build(family, overrides)
    ids = torch.randint(0, 100, (3, SEQ), generator=torch.Generator().manual_seed(0))
    adapter = LlamaAdapter(model)
    with torch.no_grad():
        expected = model(ids).logits
        hidden = adapter.embed(ids)
        kwargs = adapter.block_kwargs(SEQ, torch.device("cpu"), torch.float32)
        for block in adapter.blocks:
            hidden = adapter.call_block(block, hidden, kwargs)
        torch.testing.assert_close(adapter.head(hidden), expected, rtol=1e-5, atol=1e-5)
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids]
    result = perplexity(adapter, ids.reshape(1, -1), SEQ, FP32_CPU, batch_size=2)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


@pytest.mark.parametrize("family,option,overrides", MATRIX, ids=IDS)
def test_calibration_and_training_calls_match_each_block_inside_the_model(family, option, overrides):
    model = build(family, overrides)
    ids = torch.randint(0, 100, (4, SEQ), generator=torch.Generator().manual_seed(1))
    _, io = own_block_io(model, ids)
    adapter = LlamaAdapter(model)
    kwargs = adapter.block_kwargs(SEQ, torch.device("cpu"), torch.float32)
    for i, block in enumerate(adapter.blocks):
        x, y = io[i]
        with torch.no_grad():  # calibration: the pruning statistics' and propagation's forward, batch of 2
            out = torch.cat([adapter.call_block(block, x[k:k + 2], kwargs) for k in (0, 2)])
        torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)
        block.train().requires_grad_(True)  # EBFT training: as finetune_block calls it
        try:
            out = adapter.call_block(block, x, kwargs)
            assert out.requires_grad
            torch.testing.assert_close(out.detach(), y, rtol=1e-5, atol=1e-5)
        finally:
            block.eval().requires_grad_(False)


@pytest.mark.parametrize("family,option,overrides", [m for m in MATRIX if "sliding_window" in m[2]],
                         ids=[i for i, m in zip(IDS, MATRIX) if "sliding_window" in m[2]])
def test_the_window_is_really_exercised(family, option, overrides):
    """Guard for the matrix: without its sliding window the same weights give other logits at SEQ tokens, so
    the tests above would fail if the blocks were called without the model's window mask."""
    model = build(family, overrides)
    plain = build(family, {k: v for k, v in overrides.items()
                           if k not in ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers")})
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max() > 100 * 1e-5  # 100x the tolerance
        short = ids[:, :WINDOW]  # within one window both agree
        torch.testing.assert_close(model(short).logits, plain(short).logits, rtol=1e-5, atol=1e-5)


def test_an_argument_the_blocks_would_lose_is_refused_at_load_naming_it(monkeypatch):
    """A model whose forward hands its blocks something beyond the mask and positions cannot be reproduced
    block by block: the adapter refuses it when it is built (at load), naming the argument."""
    model = build("llama", {})

    def forward(inputs_embeds=None, **kwargs):  # a base model whose loop passes one more keyword argument
        hidden = inputs_embeds
        for layer in model.model.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=None, position_embeddings=None,
                           token_type_scale=2.0)
        return hidden

    monkeypatch.setattr(model.model, "forward", forward)
    with pytest.raises(ModelLoadError, match="token_type_scale"):
        LlamaAdapter(model)


@pytest.mark.parametrize("family,overrides", [
    ("mistral", {"sliding_window": WINDOW}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
], ids=["mistral", "qwen2"])
def test_a_whole_run_scores_the_model_transformers_scores(family, overrides, tmp_path, text_files):
    """Through the product: dense, a baseline and EBFT on a sliding-window model, calibrated and evaluated on
    sequences four windows long; each perplexity equals transformers' own forward on those weights."""
    from ebft_engine import RunConfig, run
    from ebft_engine.data import evaluation_tokens
    from ebft_engine.models import byte_tokenizer

    model = build(family, {**overrides, "vocab_size": 260, "max_position_embeddings": 128})
    folder = tmp_path / family
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    calib, evaluation = text_files
    config = RunConfig.from_dict({
        "model": str(folder), "prune": {"method": "wanda", "sparsity": 0.5}, "baselines": ["magnitude"],
        "calib": {"source": f"file:{calib}", "nsamples": 4, "seqlen": 4 * WINDOW},
        "ebft": {"epochs": 1, "lr": 1e-3, "batch_size": 2},
        "eval": {"source": f"file:{evaluation}", "seqlen": 4 * WINDOW, "windows": 3},
        "device": "cpu", "dtype": "float32", "runs_dir": str(tmp_path / "runs"), "save_model": str(tmp_path / "out"),
    })
    summary = list(run(config))[-1].summary
    assert summary["status"] == "finished"

    ids, _ = evaluation_tokens(byte_tokenizer(), f"file:{evaluation}", 4 * WINDOW)
    windows = ids[0, : 3 * 4 * WINDOW].view(3, 4 * WINDOW)

    def own_ppl(m) -> float:
        with torch.no_grad():
            return math.exp(sum(m(w[None], labels=w[None]).loss.item() for w in windows) / len(windows))

    assert summary["ppl"]["dense"] == pytest.approx(own_ppl(model), rel=1e-5)
    saved = getattr(transformers, CLASSES[family][1]).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert summary["ppl"]["ebft"] == pytest.approx(own_ppl(saved), rel=1e-5)
    assert summary["ppl"]["ebft"] != pytest.approx(summary["ppl"]["magnitude"], rel=1e-3)
