"""DSnoT, OWL and EBFT with global propagation on small matrices and the tiny model
(docs/methods/dsnot.md#the-swap-rule, docs/methods/owl.md#per-block-sparsity,
docs/methods/ebft.md#global-propagation-ebft-gp)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebft_engine import RunConfig, run
from ebft_engine.config import ConfigError
from ebft_engine.pipeline import OWL_BOUNDS, owl_sparsities, owl_spread
from ebft_engine.sparsity.structured import dense_shapes as st_dense_shapes
from ebft_engine.sparsity import LayerStats, get_method
from ebft_engine.sparsity.dsnot import refine
from ebft_engine.sparsity.wanda import wanda_scores


def _layer(seed=0, out=16, cols=32, tokens=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) + torch.linspace(-1, 2, cols)  # channels with nonzero means
    sequences = 4
    stats = LayerStats(input_norms=(x * x).sum(0) / sequences, token_mean_sum=x.sum(0) / sequences,
                       token_var=x.var(0, unbiased=False))
    return w, x, stats


def _eps(w, mask, stats):
    return ((w * stats.token_mean_sum) * ~mask).sum(1)


def test_dsnot_keeps_every_rows_count_and_shrinks_the_expected_error():
    w, _x, stats = _layer()
    initial = get_method("wanda").fn(w, stats, 0.5, None).mask
    refined = refine(w, initial, stats.input_norms, stats.token_mean_sum, stats.token_var, None)
    assert torch.equal(refined.sum(1), initial.sum(1))  # the same sparsity in every row
    assert not torch.equal(refined, initial)
    before, after = _eps(w, initial, stats).abs(), _eps(w, refined, stats).abs()
    assert after.sum() < 0.8 * before.sum()  # greedy swaps can overshoot a row, but the total error falls


def test_dsnot_keeps_n_of_m_valid():
    w, _x, stats = _layer(seed=1)
    initial = get_method("wanda").fn(w, stats, 0.5, (2, 4)).mask
    refined = refine(w, initial, stats.input_norms, stats.token_mean_sum, stats.token_var, (2, 4))
    assert bool((refined.view(16, 8, 4).sum(2) == 2).all())
    assert _eps(w, refined, stats).abs().sum() <= _eps(w, initial, stats).abs().sum()


def test_dsnot_refines_attention_only_by_default():
    from ebft_engine.config import PruneConfig

    w, _x, stats = _layer(seed=2)
    wanda = get_method("wanda").fn(w, stats, 0.5, None).mask
    dsnot = get_method("dsnot")
    default, everything = PruneConfig(method="dsnot"), PruneConfig(method="dsnot", dsnot_layers="all")
    assert torch.equal(dsnot.fn(w, stats, 0.5, None, layer="up_proj", cfg=default).mask, wanda)
    assert not torch.equal(dsnot.fn(w, stats, 0.5, None, layer="q_proj", cfg=default).mask, wanda)
    assert not torch.equal(dsnot.fn(w, stats, 0.5, None, layer="up_proj", cfg=everything).mask, wanda)
    assert "hessian" in dsnot.needs_with(PruneConfig(method="dsnot", dsnot_init="sparsegpt-mask"))


def test_owl_spreads_sparsity_by_outliers_around_the_target():
    lods = [1.0, 3.0, 2.0, 5.0]
    s = owl_sparsities(lods, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s.index(min(s)) == lods.index(max(lods))  # the most outliers keep the most weights
    assert owl_sparsities([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]


OWL_LODS = st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=500, deadline=None)
@given(lods=OWL_LODS, sparsity=st.floats(0, 0.999), lam=st.floats(0, 5))
def test_owl_profile_averages_the_target_exactly_within_bounds_in_outlier_order(lods, sparsity, lam):
    s = owl_sparsities(lods, sparsity, lam)
    lo, hi = min(OWL_BOUNDS[0], sparsity), max(OWL_BOUNDS[1], sparsity)
    assert len(s) == len(lods)
    assert abs(sum(s) / len(s) - sparsity) <= 1e-9
    assert all(lo - 1e-12 <= x <= hi + 1e-12 for x in s)
    for a, b in zip(lods, s):  # more outliers never get a higher sparsity
        assert all(y <= b + 1e-12 for x, y in zip(lods, s) if x > a)
    raw = owl_spread(lods, sparsity, lam)
    inside = [x - r for x, r in zip(s, raw) if lo + 1e-9 < x < hi - 1e-9]
    assert max(inside, default=0) - min(inside, default=0) <= 1e-9  # the unclamped blocks move together
    if all(lo <= r <= hi for r in raw):
        assert s == pytest.approx(raw, abs=1e-12)  # nothing to clamp: OWL's own profile


@pytest.mark.parametrize("lods, sparsity, lam, expected", [
    ([0.75, 0.81, 0.83, 0.77], 0.9, 0.2, [0.99, 0.86, 0.76, 0.99]),  # issue #11: block 0 would be 1.104
    ([1.0, 2.0, 3.0, 4.0], 0.05, 0.1, [0.1233333, 0.0566667, 0.01, 0.01]),  # raw 0.017, -0.05: two at the floor
    ([1.0, 2.0, 3.0], 0.995, 0.3, [0.995, 0.995, 0.995]),  # a target above 0.99 is every block's
    ([1.0, 5.0], 0.0, 0.08, [0.0, 0.0]),  # nothing pruned anywhere
])
def test_owl_profile_gives_a_clamped_blocks_share_to_the_others(lods, sparsity, lam, expected):
    s = owl_sparsities(lods, sparsity, lam)
    assert s == pytest.approx(expected, abs=1e-6)
    assert sum(s) / len(s) == pytest.approx(sparsity, abs=1e-12)


def test_owl_at_90_with_a_wide_spread_measures_90_within_rounding(tiny_run_config, tmp_path):
    """Issue #11: owl-wanda 0.9 with λ 0.2 on a 4-block model clamped block 0 to 0.99 and measured 86.7%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft_engine.models import byte_tokenizer
    from ebft_engine.sparsity import prune_count

    torch.manual_seed(0)
    model_config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False)
    LlamaForCausalLM(model_config).save_pretrained(tmp_path / "tiny4")
    byte_tokenizer().save_pretrained(tmp_path / "tiny4")
    config = tiny_run_config.with_overrides({"model": str(tmp_path / "tiny4"), "prune.method": "owl-wanda",
                                             "prune.sparsity": 0.9, "prune.owl_lambda": 0.2, "ebft.epochs": 0})
    events = list(run(config))
    summary = events[-1].summary
    assert summary["status"] == "finished"
    profile = summary["sparsity_profile"]["owl-wanda"]
    # OWL's clamped profile is about [0.99, 0.86, 0.76, 0.99]; in whole weights per row (steps of 1/64 here,
    # docs/methods/owl.md#whole-weights-per-row) the clamped blocks stay under 0.99, and the part of a step left
    # over goes to one block, so the mean is still 0.9
    assert sum(not float(s * 64).is_integer() for s in profile) <= 1 and max(profile) == 63 / 64
    assert sum(profile) / 4 == pytest.approx(0.9, abs=1e-6)
    warnings = [e.text for e in events if e.kind == "notice" and e.level == "warning"]
    assert any(w.startswith("OWL: λ=0.2 spreads the sparsity of block(s) 0 beyond [0.01, 0.99]") and
               "the mean stays 0.9" in w for w in warnings), warnings
    # Wanda removes int(cols * s) of every row: whole counts lose nothing, the one fractional block under a
    # weight per row; before whole rows every row of every block lost up to one (0.9 - 1/64 < measured <= 0.9)
    shapes = st_dense_shapes(model_config)
    total = 4 * sum(n_in * n_out for n_in, n_out in shapes.values())
    removed = sum(n_out * prune_count(n_in, s) for s in profile for n_in, n_out in shapes.values())
    measured = summary["actual_sparsity"]["owl-wanda"]
    assert measured == pytest.approx(removed / total, abs=1e-12)
    assert 0 <= 0.9 - measured < sum(n_out for _n_in, n_out in shapes.values()) / total


def test_owl_with_n_of_m_is_refused():
    with pytest.raises(ConfigError, match="unstructured"):
        RunConfig.from_dict({"prune": {"method": "owl-wanda", "pattern": "2:4"}})
    with pytest.raises(ConfigError, match="baselines"):
        RunConfig.from_dict({"prune": {"pattern": "2:4"}, "baselines": ["owl-wanda"]})
    with pytest.raises(ConfigError, match="recoveries"):
        RunConfig.from_dict({"recoveries": ["lora-ish"]})


def test_one_run_compares_dsnot_owl_ebft_and_ebft_gp(tiny_run_config):
    config = tiny_run_config.with_overrides({"baselines": "wanda,dsnot,owl-wanda", "recoveries": "ebft,ebft-gp"})
    events = list(run(config))
    summary = events[-1].summary
    assert summary["status"] == "finished"
    assert list(summary["ppl"]) == ["dense", "wanda", "dsnot", "owl-wanda", "ebft", "ebft-gp"]
    assert summary["actual_sparsity"]["dsnot"] == pytest.approx(0.5)
    assert summary["mask_sha256"]["dsnot"] != summary["mask_sha256"]["wanda"]
    profile = summary["sparsity_profile"]["owl-wanda"]
    assert len(profile) == 2 and sum(profile) / 2 == pytest.approx(0.5) and profile[0] != profile[1]
    rows = {(b["label"], b["index"]): b for b in summary["blocks"]}
    # block 0 sees the same inputs and targets either way; later blocks' targets differ
    assert rows[("ebft", 0)]["initial_loss"] == pytest.approx(rows[("ebft-gp", 0)]["initial_loss"])
    assert rows[("ebft", 1)]["initial_loss"] != pytest.approx(rows[("ebft-gp", 1)]["initial_loss"])
    assert all(r["final_loss"] < r["initial_loss"] for r in rows.values())


def test_lora_recovery_reports_adapters_and_the_merged_remasked_model(tiny_run_config):
    from torch import nn

    from ebft_engine.models import _CACHE

    config = tiny_run_config.with_overrides({"recoveries": "ebft,lora", "lora.lr": 1e-2, "lora.budget": "epochs",
                                             "lora.epochs": 6, "lora.targets": "q_proj,v_proj,down_proj"})
    summary = list(run(config))[-1].summary
    assert summary["status"] == "finished"
    assert list(summary["ppl"]) == ["dense", "ebft", "lora", "lora-merged"]
    lora = summary["lora"]
    h, kv, f, r, blocks = 64, 32, 128, 8, 2  # the tiny model: q (h->h), v (h->kv), down (f->h), two blocks
    assert lora["adapter_params"] == blocks * r * ((h + h) + (h + kv) + (f + h))
    assert lora["steps"] == 6 * (8 // 4) and lora["last_loss"] < lora["first_loss"]
    assert summary["actual_sparsity"]["lora"] == pytest.approx(0.5)
    assert summary["actual_sparsity"]["lora-merged"] == pytest.approx(0.5)  # re-masked after the merge
    assert summary["ppl"]["lora"] != summary["ppl"]["lora-merged"]
    # the cached model is a plain model again, ready for the next run
    (model, _tok, _dense), = _CACHE.values()
    assert all(type(m) is nn.Linear for m in model.model.layers[0].self_attn.children() if isinstance(m, nn.Module))
    assert not any("lora_" in name for name, _ in model.named_parameters())
    again = list(run(tiny_run_config.with_overrides({"ebft.epochs": 0})))[-1].summary
    assert again["ppl"]["dense"] == pytest.approx(summary["ppl"]["dense"], rel=1e-9)


def test_lora_matches_ebfts_wall_clock_by_default(tiny_run_config):
    summary = list(run(tiny_run_config.with_overrides({"recoveries": "ebft,lora"})))[-1].summary
    ebft_seconds, lora = summary["seconds"]["ebft:ebft"], summary["lora"]
    assert lora["budget"] == "ebft's time"
    assert lora["seconds"] <= ebft_seconds * 1.5 + 1.0  # stops at the first step past EBFT's time


def test_merge_and_remask_keeps_pruned_weights_zero():
    from torch import nn

    from ebft_engine.config import LoraConfig
    from ebft_engine.finetune.lora import lora_adapters, merge_and_remask

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    model = Tiny()
    with torch.no_grad():
        model.q_proj.weight[:, :4] = 0
    pruned = model.q_proj.weight.clone()
    with lora_adapters(model, LoraConfig(targets="q_proj")) as peft_model:
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p)
        merge_and_remask(peft_model)
    w = model.q_proj.weight
    assert type(model.q_proj) is nn.Linear
    assert bool((w[:, :4] == 0).all()) and not torch.equal(w[:, 4:], pruned[:, 4:])


def test_self_generated_sequences_feed_the_reconstruction_but_not_the_pruning_statistics(tiny_run_config):
    """Shin et al.'s calibration mix: generated sequences are appended for EBFT; the masks (Wanda, SparseGPT and
    OWL statistics) come from the source's sequences alone, so they are the same as without the mix."""
    base = tiny_run_config.with_overrides({"baselines": ["owl-wanda", "sparsegpt"], "ebft.epochs": 2})
    plain = list(run(base))[-1].summary
    mixed_events = list(run(base.with_overrides({"calib.self_nsamples": 4})))
    mixed = mixed_events[-1].summary
    assert mixed["status"] == "finished"
    assert mixed["calibration"]["self_nsamples"] == 4
    assert mixed["calibration"]["tokens"] == (8 + 4) * 32
    assert any("appended for the reconstruction only" in e.text for e in mixed_events if e.kind == "notice")
    # (EBFT's masks may differ after block 0: each block is pruned on the outputs of the blocks trained before it)
    for label in ("owl-wanda", "sparsegpt"):
        assert mixed["mask_sha256"][label] == plain["mask_sha256"][label], label
    assert mixed["sparsity_profile"]["owl-wanda"] == plain["sparsity_profile"]["owl-wanda"]
    assert mixed["ppl"]["sparsegpt"] == pytest.approx(plain["ppl"]["sparsegpt"], rel=1e-9)
    assert mixed["ppl"]["ebft"] != pytest.approx(plain["ppl"]["ebft"], rel=1e-6)  # EBFT trained on more data


def test_mixing_generated_sequences_into_a_generated_set_is_refused():
    with pytest.raises(ConfigError, match="already generated"):
        RunConfig.from_dict({"calib": {"source": "self", "self_nsamples": 8}})


def test_sparsegpt_says_why_dead_channels_measure_above_the_target_and_a_resume_keeps_the_count(
        tiny_run_config, tiny_llama, tmp_path):
    """Issue #11: SparseGPT zeroes the weights of inputs that never fire (the reference's W[:, dead] = 0); at 2:4
    a group of four dead columns still keeps two of them, zero, so the model measures above 50%. The run says so
    per variant and records the count, and a resumed run counts the same."""
    import threading

    from ebft_engine import resume
    from ebft_engine.models import byte_tokenizer

    with torch.no_grad():  # a zero norm weight silences its channel for every token
        tiny_llama.model.layers[0].input_layernorm.weight[:16] = 0  # q, k, v of block 0 read 16 dead inputs
        tiny_llama.model.layers[1].post_attention_layernorm.weight[8:24] = 0  # gate, up of block 1 likewise
    tiny_llama.save_pretrained(tmp_path / "dead")
    byte_tokenizer().save_pretrained(tmp_path / "dead")
    config = tiny_run_config.with_overrides({
        "model": str(tmp_path / "dead"), "prune.method": "sparsegpt", "prune.pattern": "2:4",
        "prune.sparsity": None, "baselines": "sparsegpt,wanda", "ebft.epochs": 1})
    events = list(run(config))
    summary = events[-1].summary
    assert summary["status"] == "finished"
    total = 2 * sum(n_in * n_out for n_in, n_out in st_dense_shapes(tiny_llama.config).values())
    blocks = {"0": {"q_proj": 64 * 2 * 4, "k_proj": 32 * 2 * 4, "v_proj": 32 * 2 * 4},  # rows x 2 kept x 4 groups
              "1": {"gate_proj": 128 * 2 * 4, "up_proj": 128 * 2 * 4}}
    warnings = [e.text for e in events if e.kind == "notice" and e.level == "warning"]
    for label in ("sparsegpt", "ebft"):  # EBFT trains from sparsegpt's masks; dead inputs give zero gradients
        measured = summary["actual_sparsity"][label]
        assert summary["dead_channel_weights"][label] == {"weights": 3072, "layers": 5, "blocks": blocks}
        assert measured * total == pytest.approx(total / 2 + 3072)  # exactly the zeroed weights above 50%
        assert (f"{label}: 3,072 weights in 5 layers were zeroed because their input channel never fires (dead "
                f"channels, as the reference SparseGPT does); measured sparsity {measured:.1%} vs 50.0% asked"
                in warnings), warnings
    assert summary["actual_sparsity"]["wanda"] == 0.5 and "wanda" not in summary["dead_channel_weights"]
    assert not any(w.startswith("wanda:") for w in warnings)

    cancel = threading.Event()  # stop inside sparsegpt's block 1: block 0's count must survive the resume
    stopped = []
    for event in run(config.with_overrides({"runs_dir": str(tmp_path / "stopped")}), cancel):
        stopped.append(event)
        if event.kind == "block_started" and event.label == "sparsegpt" and event.block == 1:
            cancel.set()
    assert stopped[-1].status == "cancelled"
    assert stopped[-1].summary["dead_channel_weights"]["sparsegpt"]["blocks"] == {"0": blocks["0"]}
    resumed = list(resume(stopped[0].run_dir))
    assert any("resuming sparsegpt: blocks 0-0 restored" in e.text for e in resumed if e.kind == "notice")
    assert resumed[-1].summary["dead_channel_weights"] == summary["dead_channel_weights"]
    assert resumed[-1].summary["actual_sparsity"] == summary["actual_sparsity"]
