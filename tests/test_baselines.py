"""DSnoT, OWL and EBFT with global propagation (REFERENCE.md §4, §5, §7) on small matrices and the tiny model."""
from __future__ import annotations

import pytest
import torch

from ebft_engine import RunConfig, run
from ebft_engine.config import ConfigError
from ebft_engine.pipeline import owl_sparsities
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
