"""The memory planner: 7B-class models fit a 16 GB GPU at the paper's settings; it moves activations to the host
and suggests a smaller batch when the device is small; a CPU run is all host memory."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from ebft_engine import RunConfig
from ebft_engine.device import Precision
from ebft_engine.planner import GiB, Shape, eval_hidden_placement, plan_memory
from ebft_engine.remedies import suggestion

GPU16 = 16 * 10 ** 9
CUDA_BF16 = Precision(torch.device("cuda"), torch.bfloat16, torch.bfloat16)
SEVEN_B = {
    "llama-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            vocab_size=32000, max_position_embeddings=2048),
    "llama-2-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              max_position_embeddings=8192),
}


@pytest.fixture
def paper():
    return RunConfig.from_yaml("assets/presets/llama-7b-paper.yaml")


def test_parameter_counts_match_the_published_sizes():
    assert Shape.of(SEVEN_B["llama-7b"]).params == pytest.approx(6.74e9, rel=0.01)
    assert Shape.of(SEVEN_B["llama-3-8b"]).params == pytest.approx(8.03e9, rel=0.01)


@pytest.mark.parametrize("name", list(SEVEN_B))
def test_seven_b_fits_a_16_gb_gpu_at_the_paper_settings(name, paper):
    plan = plan_memory(SEVEN_B[name], paper, CUDA_BF16, device_capacity=GPU16)
    assert plan.fits and plan.peak_device < 14 * GiB
    assert plan.phase("ebft").device == plan.peak_device  # training one block is the peak


def test_a_small_device_moves_activations_to_the_host_and_the_advice_fits(paper):
    big = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=GPU16)
    small = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=8 * GiB)
    assert big.activations == "device" and small.activations == "host"
    assert small.phase("ebft").host > big.phase("ebft").host  # they moved, they did not vanish
    tiny = 6 * GiB
    advice = suggestion(SEVEN_B["llama-7b"], paper, CUDA_BF16, tiny)
    assert "--batch-size" in advice
    batch = int(advice.split("--batch-size ")[1].split()[0])
    fixed = paper.with_overrides({"ebft.batch_size": batch})
    acts = "host" if "--activations host" in advice else None
    assert plan_memory(SEVEN_B["llama-7b"], fixed, CUDA_BF16, device_capacity=tiny, activations=acts).fits


def test_an_impossible_device_is_refused_with_a_reason(paper):
    plan = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=1 * GiB)
    assert not plan.fits and "on the cuda device" in plan.problem


def test_a_cpu_run_is_all_host_memory(paper):
    plan = plan_memory(SEVEN_B["llama-7b"], paper, Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16))
    assert plan.peak_device == 0 and plan.activations == "host"
    assert plan.phase("ebft").host > Shape.of(SEVEN_B["llama-7b"]).params * 2  # the model and more


def test_seven_b_host_memory_stays_close_to_the_model_bytes(paper):
    """No second copy of the weights on the host: the dense blocks come back from the safetensors files."""
    plan = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=GPU16)
    model_bytes = Shape.of(SEVEN_B["llama-7b"]).params * 2
    evaluation_states = 165 * 2048 * 4096 * 2  # WikiText-2's windows' hidden states, bf16
    assert plan.peak_host < model_bytes + evaluation_states + 1 * GiB


def test_structured_pruning_plans_its_whole_model_importance_pass(paper):
    """LLM-Pruner's importance pass holds the whole model on the device for one short backward pass: planned as
    its own phase, above the model's bytes; LLaMA-7B still fits a 16 GB GPU."""
    structured = paper.with_overrides({"prune.method": "llm-pruner", "prune.pattern": "structured",
                                       "prune.sparsity": 0.2, "baselines": []})
    plan = plan_memory(SEVEN_B["llama-7b"], structured, CUDA_BF16, device_capacity=GPU16)
    model_bytes = Shape.of(SEVEN_B["llama-7b"]).params * 2
    assert model_bytes < plan.phase("importance").device < 14 * GiB
    assert plan.fits
    assert "importance" not in {p.phase for p in plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16,
                                                               device_capacity=GPU16).phases}


@pytest.mark.parametrize("overrides,hessians", [
    ({"baselines": ["wanda"]}, False),
    ({"baselines": ["sparsegpt"]}, True),
    ({"baselines": ["sparsegpt-mask"]}, True),
    ({"baselines": ["owl-sparsegpt"]}, True),
    ({"baselines": ["dsnot"], "prune.dsnot_init": "sparsegpt-mask"}, True),
    ({"baselines": ["dsnot"]}, False),
    ({"prune.method": "sparsegpt-mask"}, True),
])
def test_hessians_are_planned_for_every_method_the_registry_says_reads_them(paper, overrides, hessians):
    """The prune phase holds SparseGPT's Hessians for any method that reads them (the registry says which);
    EBFT's phase too when its own masks come from such a method, before the block trains."""
    config = paper.with_overrides({"prune.method": "wanda", **overrides})
    plan = plan_memory(SEVEN_B["llama-7b"], config, CUDA_BF16, device_capacity=GPU16)
    h, f = 4096, 11008
    assert plan.phase("prune").parts["hessians"] == (3 * (3 * h * h + f * f) * 4 if hessians else 0)


@pytest.mark.parametrize("overrides", [{"baselines": ["alps"]}, {"baselines": ["owl-alps", "sparsegpt"]},
                                       {"prune.method": "alps"}])
def test_alps_plans_its_eigendecomposition_or_admm_state_on_top_of_the_hessians(paper, overrides):
    """ALPS holds what SparseGPT does (sums, scaled copy, a factor: its eigenvectors) and then the larger of the
    eigendecomposition's transients (about 4 f^2) and its ADMM's float32 buffers of the widest layer (12 h f: the
    larger for LLaMA-7B)."""
    small = {"ebft.batch_size": 1, "calib.nsamples": 16}  # so that pruning, not training, sets EBFT's peak
    config = paper.with_overrides({"prune.method": "wanda", **small, **overrides})
    plan = plan_memory(SEVEN_B["llama-7b"], config, CUDA_BF16, device_capacity=GPU16)
    h, f = 4096, 11008
    sgpt_bytes, alps_bytes = 3 * (3 * h * h + f * f) * 4, (3 * (3 * h * h + f * f) + 12 * h * f) * 4
    assert plan.phase("prune").parts["hessians"] == alps_bytes
    sgpt = plan_memory(SEVEN_B["llama-7b"], config.with_overrides({"prune.method": "sparsegpt", "baselines": []}),
                       CUDA_BF16, device_capacity=GPU16)
    if config.prune.method == "alps":  # EBFT's own pruning pass is ALPS's
        assert plan.phase("ebft").device - sgpt.phase("ebft").device == alps_bytes - sgpt_bytes


def test_ebfts_phase_covers_pruning_its_block_with_hessians(paper):
    small = {"ebft.batch_size": 1, "calib.nsamples": 16}
    wanda = plan_memory(SEVEN_B["llama-7b"], paper.with_overrides({"prune.method": "wanda", **small}),
                        CUDA_BF16, device_capacity=GPU16, host_capacity=None)
    sgpt = plan_memory(SEVEN_B["llama-7b"], paper.with_overrides({"prune.method": "sparsegpt", **small}),
                       CUDA_BF16, device_capacity=GPU16, host_capacity=None)
    # with one sequence per step and few calibration streams, training and propagation need less than
    # SparseGPT's pruning pass: that pass sets the peak
    assert sgpt.phase("ebft").device > wanda.phase("ebft").device


def test_one_shape_arithmetic_for_a_head_dim_other_than_hidden_over_heads():
    """Qwen3-0.6B's shape (hidden 1024, 16 heads of head_dim 128: q and o are 2048 wide): the planner, the
    parameter count and structured pruning's shapes agree with the model transformers builds."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ebft_engine.models import count_params, projection_shapes

    config = Qwen3Config(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=32, vocab_size=1000, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    block = model.model.layers[0]
    built = {name: (m.in_features, m.out_features) for name, m in block.named_modules()
             if name.split(".")[-1] in projection_shapes(config)}
    assert {k.split(".")[-1]: v for k, v in built.items()} == projection_shapes(config)
    real = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n)
    assert count_params(config) == Shape.of(config).params == real - norms  # q/k norms: too few to count


def test_learned_masks_plan_their_dense_copy_latents_and_rank_buffers(paper):
    """ebft-mask holds a float32 dense copy while the block is pruned, then float32 latents, a second mask and
    one projection's selection buffers while it trains: the EBFT phase grows by exactly that."""
    shape = Shape.of(SEVEN_B["llama-7b"])
    fixed = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=GPU16, activations="device")
    learned = plan_memory(SEVEN_B["llama-7b"], paper.with_overrides({"recoveries": "ebft,ebft-mask"}), CUDA_BF16,
                          device_capacity=GPU16, activations="device")
    extra = shape.block_params * 5 + shape.hidden * shape.intermediate * 20
    assert learned.phase("ebft").device - fixed.phase("ebft").device == extra
    assert learned.fits  # 7B with learned masks still fits 16 GB


def test_a_large_model_without_safetensors_plans_its_dense_copy_in_host_memory(paper, tmp_path):
    """Between variants the dense blocks come back from the safetensors files (FileBackedBlocks); a GGUF file or a
    .bin-only folder cannot be re-read that way, so Run._keep_dense keeps a host copy: 12.3 GiB for LLaMA-7B in
    float16, which the plan must hold, in every phase after the load."""
    config = SEVEN_B["llama-7b"]
    p = Precision(torch.device("cuda"), torch.float16, torch.float16)
    files = plan_memory(config, paper, p, from_files=True)
    copy = plan_memory(config, paper, p, from_files=False)
    blocks = Shape.of(config).layers * Shape.of(config).block_params * 2
    assert blocks / GiB == pytest.approx(12.06, abs=0.01)
    for phase in ("data", "eval", "prune", "ebft"):
        assert copy.phase(phase).host - files.phase(phase).host == blocks
    assert copy.phase("load").host == files.phase("load").host
    assert plan_memory(config, paper, p, gguf=True).phase("ebft").host == copy.phase("ebft").host  # GGUF: a copy
    single = paper.with_overrides({"baselines": [], "recoveries": ["ebft"]})  # one variant: nothing to restore
    assert plan_memory(config, single, p, from_files=False).phases == plan_memory(config, single, p).phases


def test_which_sources_restore_their_dense_blocks_from_files(tmp_path):
    from ebft_engine.models import TINY_NAME, ModelSource, restores_from_files

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "model.safetensors").write_bytes(b"")
    assert not restores_from_files(ModelSource("m", str(tmp_path / "bin")))
    assert restores_from_files(ModelSource("m", str(tmp_path / "st")))
    assert not restores_from_files(ModelSource("x", "x", gguf_file="m.gguf"))
    assert not restores_from_files(ModelSource(TINY_NAME, TINY_NAME))
    assert restores_from_files(ModelSource("huggyllama/llama-7b", "huggyllama/llama-7b"))


@pytest.mark.parametrize("work,hidden,capacity,where", [
    (2 * GiB, 2 * GiB, 16 * GiB, "device"),
    (2 * GiB, 2 * GiB, int(4 * GiB / 0.92) + 1, "device"),  # just within the headroom
    (2 * GiB, 2 * GiB, int(4 * GiB / 0.92) - 1, "host"),  # just beyond it
    (2 * GiB, 20 * GiB, 16 * GiB, "host"),
    (2 * GiB, 2 * GiB, None, "device"),  # capacity unknown: taken to fit, as calibration activations are
])
def test_evaluation_states_go_to_the_device_only_when_they_fit_beside_its_work(work, hidden, capacity, where):
    assert eval_hidden_placement(work, hidden, capacity) == where


def test_the_eval_phase_counts_the_hidden_states_where_they_live(paper):
    """LLaMA-7B on WikiText-2 (planned as 340,000 tokens: 166 windows of 2048): 2.59 GiB of bf16 states fit a
    16 GB card beside the block, the head and a logits chunk, so they leave the host; on a 5 GiB card they stay
    there, pinned (torch rounds a pinned block up to a power of two: 4 GiB), and the device holds two batches of
    inputs (the running one and the next) instead."""
    states, batch = 166 * 2048 * 4096 * 2, 4 * 2048 * 4096 * 2
    auto = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=GPU16)
    host = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=GPU16, eval_hidden="host")
    assert auto.eval_hidden == "device" and host.eval_hidden == "host"
    assert auto.phase("eval").device - host.phase("eval").device == states - 2 * batch
    assert host.phase("eval").host - auto.phase("eval").host == 4 * GiB  # pinned: a power-of-two block
    assert auto.phase("eval").host == auto.phase("load").host  # nothing of the evaluation's on the host
    assert auto.phase("eval").device <= GPU16 * 0.92 and auto.peak_device == host.peak_device  # EBFT's peak
    small = plan_memory(SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=5 * GiB)
    assert small.eval_hidden == "host" and small.phase("eval") == plan_memory(
        SEVEN_B["llama-7b"], paper, CUDA_BF16, device_capacity=5 * GiB, eval_hidden="host").phase("eval")
    assert "evaluation hidden states on the device" in auto.summary()
    assert "evaluation hidden states on the host" in small.summary()


def test_a_cpu_run_keeps_the_evaluation_states_on_the_host(paper):
    plan = plan_memory(SEVEN_B["llama-7b"], paper, Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16),
                       eval_hidden="device")
    assert plan.eval_hidden == "host" and plan.phase("eval").device == 0
    assert plan.phase("eval").host > plan.phase("load").host + 166 * 2048 * 4096 * 2


def test_a_host_lever_is_offered_only_when_its_plan_fits_the_host(paper):
    """A CPU run of LLaMA-7B with host memory just under its peak: the advice is a lever whose own plan fits, or
    (below the model's floor) none at all, always with the host memory the run needs."""
    from ebft_engine.remedies import remedy

    cpu = Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16)
    model = SEVEN_B["llama-7b"]
    full = plan_memory(model, paper, cpu)
    short = plan_memory(model, paper, cpu, host_capacity=full.peak_host - GiB // 4)
    advice = remedy(short, model, paper, cpu)
    assert advice.startswith("try --batch-size ") and f"at least {math.ceil(full.peak_host / GiB * 100) / 100:.2f} GiB" in advice
    batch = int(advice.split("--batch-size ")[1].split()[0])
    assert plan_memory(model, paper.with_overrides({"ebft.batch_size": batch}), cpu,
                       host_capacity=short.host_capacity).fits
    floor = plan_memory(model, paper, cpu, host_capacity=full.phase("load").host - 1)
    assert remedy(floor, model, paper, cpu).startswith("no setting brings it under")
