"""Structured pruning (LLM-Pruner, docs/methods/llm-pruner.md#coupled-groups): whole heads and MLP channels leave,
the matrices get smaller, the block computes what the dense block computes with those groups cut out, and EBFT
and LoRA recover it."""
from __future__ import annotations

import json

import pytest
import torch

from ebft_engine import ConfigError, RunConfig, run
from ebft_engine.device import pick_precision
from ebft_engine.models import LlamaAdapter, load_model, resolve_source
from ebft_engine.sparsity import structured as st


def _model(heads: int = 4, kv: int = 2, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=16 * heads, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _block_out(model, block, x):
    adapter = LlamaAdapter(model)
    return adapter.call_block(block, x, adapter.block_kwargs(x.shape[1], torch.device("cpu"), torch.float32))


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4), (6, 2)], ids=["gqa", "mha", "gqa-3"])
def test_a_shrunk_block_computes_the_dense_block_with_its_groups_cut_out(heads, kv):
    """Cutting a head's o columns and a channel's down column out of the dense block gives exactly the output of
    the smaller block: the shrink keeps the right rows and columns, and attention still pairs each query head
    with its own key/value head."""
    model = _model(heads, kv)
    block = model.model.layers[0]
    scores = st.GroupScores(heads=torch.rand(heads), kv_heads=torch.rand(kv), channels=torch.rand(96))
    kept = st.choose(block, scores, 0.4)
    hd = block.self_attn.head_dim
    masked = _model(heads, kv).model.layers[0]  # same seed: the same weights
    with torch.no_grad():
        cut_heads = [h for h in range(heads) if h not in kept.heads]
        for h in cut_heads:
            masked.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
        for c in range(96):
            if c not in kept.channels:
                masked.mlp.down_proj.weight[:, c] = 0
    x = torch.randn(2, 16, 16 * heads)
    expected = _block_out(model, masked, x)
    st.shrink(block, kept)
    assert block.self_attn.q_proj.weight.shape == (len(kept.heads) * hd, 16 * heads)
    assert block.self_attn.o_proj.weight.shape == (16 * heads, len(kept.heads) * hd)
    assert block.mlp.down_proj.weight.shape == (16 * heads, len(kept.channels))
    torch.testing.assert_close(_block_out(model, block, x), expected, rtol=1e-5, atol=1e-5)
    if heads == kv:  # without grouped queries a whole head goes: its key and value rows too
        assert kept.kv_heads == kept.heads and len(kept.heads) < heads
    else:  # every key/value group keeps the same number of query heads
        per_group = [sum(1 for h in kept.heads if h // (heads // kv) == k) for k in range(kv)]
        assert len(set(per_group)) == 1 and per_group[0] < heads // kv


def test_the_least_important_groups_go_and_the_block_loses_the_asked_share():
    model = _model(4, 4)
    block = model.model.layers[0]
    dense = sum(l.weight.numel() for l in LlamaAdapter.linears(block).values())
    scores = st.GroupScores(heads=torch.tensor([4.0, 1.0, 3.0, 2.0]), kv_heads=torch.zeros(4),
                            channels=torch.arange(96, dtype=torch.float32))
    kept = st.choose(block, scores, 0.25)
    assert kept.heads == (0, 2, 3)  # head 1 had the lowest importance
    assert kept.channels == tuple(range(96 - len(kept.channels), 96))  # the lowest-numbered (least) went
    st.shrink(block, kept)
    left = sum(l.weight.numel() for l in LlamaAdapter.linears(block).values())
    assert 1 - left / dense == pytest.approx(0.25, abs=3 * 64 / dense)  # within one channel of the target


def test_taylor_importance_is_the_group_sum_of_weight_times_gradient():
    """The hooks that reduce each gradient as soon as it exists give the same sums as holding every gradient."""
    model = _model(4, 2)
    ids = torch.randint(0, 260, (3, 12))
    precision = pick_precision(torch.device("cpu"), "float32", 0)
    scores = st.taylor_importance(model, model.model.layers, [1], ids, precision)
    reference = _model(4, 2)
    reference.requires_grad_(True)
    reference(input_ids=ids, labels=ids).loss.backward()
    b = reference.model.layers[1]
    t = {n: (l.weight * l.weight.grad).abs() for n, l in LlamaAdapter.linears(b).items()}
    hd = b.self_attn.head_dim
    heads = t["q_proj"].sum(1).view(-1, hd).sum(1) + t["o_proj"].sum(0).view(-1, hd).sum(1)
    channels = t["gate_proj"].sum(1) + t["up_proj"].sum(1) + t["down_proj"].sum(0)
    torch.testing.assert_close(scores[1].heads, heads.detach(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores[1].channels, channels.detach(), rtol=1e-4, atol=1e-9)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())  # nothing left behind


@pytest.fixture
def structured_config(tiny_run_config, tmp_path):
    """The conftest run on a four-block model, so that a first and a last block can stay whole."""
    from ebft_engine.models import byte_tokenizer

    path = tmp_path / "tiny4"
    _model(4, 2, layers=4).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return tiny_run_config.with_overrides({"model": str(path),
        "prune.method": "llm-pruner", "prune.pattern": "structured", "prune.sparsity": 0.25,
        "prune.keep_first": 1, "prune.keep_last": 1, "prune.taylor_samples": 4, "prune.taylor_seqlen": 16,
        "baselines": ["llm-pruner"], "recoveries": ["ebft", "lora"], "save_model": str(tmp_path / "small")})


def test_a_structured_run_makes_the_model_smaller_and_recovers_it(structured_config, tmp_path):
    events = list(run(structured_config))
    summary = events[-1].summary
    assert summary["status"] == "finished", [e.text for e in events if e.kind == "notice"]
    assert set(summary["ppl"]) == {"dense", "llm-pruner", "ebft", "lora", "lora-merged"}
    for label in ("llm-pruner", "ebft", "lora", "lora-merged"):
        assert summary["actual_sparsity"][label] == pytest.approx(0.25, abs=0.02)
        assert summary["params"][label] < summary["params"]["dense"]
    assert summary["mask_sha256"]["llm-pruner"] == summary["mask_sha256"]["ebft"]  # the same groups removed
    structure = summary["structure"]["ebft"]
    assert structure[0] == structure[-1] and structure[1] != structure[0]  # first and last kept whole
    # EBFT trains the pruned blocks only (the whole ones already compute their own target) and lowers their loss
    assert {b["index"] for b in summary["blocks"]} == {1, 2}
    assert all(b["final_loss"] < b["initial_loss"] for b in summary["blocks"])
    assert set(summary["lora"]["targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"}
    # the saved model is the smaller one, and loads back with the same perplexity
    saved = json.loads((tmp_path / "small" / "ebft_structure.json").read_text())["blocks"]
    assert saved == structure
    model, _ = load_model(resolve_source(str(tmp_path / "small")), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == summary["params"]["lora-merged"]
    again = list(run(structured_config.with_overrides({
        "model": str(tmp_path / "small"), "prune.method": "wanda", "prune.pattern": "unstructured",
        "prune.sparsity": 0.0, "baselines": [], "recoveries": ["ebft"], "ebft.epochs": 0, "save_model": None})))
    assert again[-1].summary["ppl"]["dense"] == pytest.approx(summary["ppl"]["lora-merged"], rel=1e-4)


def test_the_next_run_in_the_process_gets_the_dense_model_back(structured_config):
    """The loaded model is cached between runs: a structured run must leave it restorable to full size."""
    unstructured = structured_config.with_overrides({"prune.method": "wanda", "prune.pattern": "unstructured",
                                                     "prune.sparsity": 0.5, "baselines": ["wanda"],
                                                     "recoveries": ["ebft"], "save_model": None})
    first = list(run(unstructured))[-1].summary
    assert list(run(structured_config.with_overrides({"save_model": None})))[-1].status == "finished"
    after = list(run(unstructured))[-1].summary
    assert after["ppl"] == pytest.approx(first["ppl"], rel=1e-6)
    assert after["mask_sha256"] == first["mask_sha256"]
    assert after["params"]["ebft"] == first["params"]["dense"]


@pytest.mark.parametrize("overrides,field", [
    ({"prune.method": "llm-pruner", "prune.pattern": "2:4"}, "prune.pattern"),
    ({"prune.method": "wanda", "prune.pattern": "structured"}, "prune.pattern"),
    ({"prune.method": "llm-pruner", "baselines": ["wanda"]}, "baselines"),
    ({"prune.method": "wanda", "baselines": ["llm-pruner"]}, "baselines"),
    ({"prune.method": "owl-llm-pruner"}, "prune.method"),
    ({"prune.method": "llm-pruner", "prune.keep_first": -1}, "prune.keep_first"),
])
def test_structured_options_that_cannot_work_are_refused(tiny_run_config, overrides, field):
    with pytest.raises(ConfigError) as e:
        tiny_run_config.with_overrides({"baselines": [], **overrides})
    assert e.value.field == field


@pytest.mark.parametrize("overrides,message", [
    ({"prune.keep_first": 2, "prune.keep_last": 2}, "leaves none"),
    ({"prune.keep_first": 3, "prune.keep_last": 0, "prune.sparsity": 0.3}, "takes 120% of each"),
])
def test_structured_settings_that_do_not_fit_the_model_are_refused_before_loading(structured_config, overrides,
                                                                                message):
    from pathlib import Path

    with pytest.raises(ConfigError, match=message):  # read from the model's config: before any run folder exists
        next(run(structured_config.with_overrides(overrides)))
    runs = Path(structured_config.runs_dir)
    assert not runs.exists() or not any(runs.iterdir())


def test_llm_pruner_implies_the_structured_pattern_and_20_percent():
    cfg = RunConfig.from_dict({"prune": {"method": "llm-pruner"}})
    assert cfg.prune.structured and cfg.prune.sparsity == pytest.approx(0.2)
    assert cfg.lora.target_modules(structured=True) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]
    assert cfg.lora.target_modules() == ["q_proj", "v_proj"]


def test_a_saved_structured_model_is_the_dense_model_of_the_runs_on_it(structured_config, tmp_path):
    """A structurally pruned model saved with --save-model and reloaded with --model DIR: its saved sizes are its
    dense sizes. A baseline plus EBFT (the dense blocks restored between the variants) and a second run in the
    same process (restored from the cache) finish, with sparsities measured against those sizes; the folder
    says how to load it, and a model saved from it loads back at its own size."""
    import io

    from ebft_engine.cli import main

    first = list(run(structured_config.with_overrides({"baselines": [], "recoveries": ["ebft"]})))
    assert first[-1].status == "finished"
    small = tmp_path / "small"
    readme = (small / "README.md").read_text()
    assert "from_pretrained" in readme and "load_model" in readme and "--model" in readme
    counts = json.loads((small / "ebft_structure.json").read_text())["blocks"]

    preset = tmp_path / "reloaded.yaml"
    preset.write_text(structured_config.with_overrides({
        "model": str(small), "prune.method": "wanda", "prune.pattern": "unstructured", "prune.sparsity": 0.5,
        "baselines": ["wanda"], "recoveries": ["ebft"], "save_model": None}).to_yaml())
    summaries = []
    for k in range(2):  # the second run in the same process gets the model from the cache
        out, json_out = io.StringIO(), tmp_path / f"summary-{k}.json"
        code = main(["run", "--config", str(preset), "--json-out", str(json_out), "--quiet"] +
                    (["--save-model", str(tmp_path / "small2")] if k else []), out=out)
        assert code == 0, out.getvalue()
        summary = json.loads(json_out.read_text())
        assert summary["params"]["dense"] == first[-1].summary["params"]["ebft"]  # loaded at its smaller size
        for label in ("wanda", "ebft"):
            assert summary["actual_sparsity"][label] == pytest.approx(0.5, abs=0.01), label  # not 0.62
            assert summary["params"][label] == summary["params"]["dense"]
        summaries.append(summary)
    assert summaries[1]["ppl"] == pytest.approx(summaries[0]["ppl"], rel=1e-6)
    assert summaries[1]["mask_sha256"] == summaries[0]["mask_sha256"]
    # saved again from the reloaded model (unstructured here): still its smaller shapes, still loadable
    assert json.loads((tmp_path / "small2" / "ebft_structure.json").read_text())["blocks"] == counts
    model, _ = load_model(resolve_source(str(tmp_path / "small2")), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == summaries[1]["params"]["ebft"]

    # structured pruning of it removes the asked share of what it has (its blocks are not the same size)
    again = list(run(structured_config.with_overrides({"model": str(small), "baselines": [], "recoveries": ["ebft"],
                                                       "ebft.epochs": 0, "save_model": None})))
    assert again[-1].status == "finished"
    assert again[-1].summary["actual_sparsity"]["llm-pruner"] == pytest.approx(0.25, abs=0.02)
    # an N:M pattern is checked against the widths it was loaded with, before any weight is read
    odd = sorted({c["channels"] for c in counts if c["channels"] % 4})
    nm = structured_config.with_overrides({
        "model": str(small), "prune.method": "wanda", "prune.pattern": "2:4", "prune.sparsity": 0.5, "baselines": [],
        "save_model": None})
    if odd:
        with pytest.raises(ConfigError, match=f"down_proj reads {odd[0]} columns"):
            list(run(nm))
    else:
        assert list(run(nm))[-1].status == "finished"
