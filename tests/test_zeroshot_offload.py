"""Zero-shot on a device too small for the whole model: the decision (planner.zeroshot_placement), its phase in the
memory plan, and the offloaded path (zeroshot.placed) scoring exactly what the plain path scores, then handing the
model back as it was."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from ebft_engine import RunConfig
from ebft_engine.device import Precision
from ebft_engine.models import byte_tokenizer
from ebft_engine.planner import DEVICE_HEADROOM, GiB, Shape, plan_memory, zeroshot_batch_bytes, zeroshot_placement
from ebft_engine.remedies import ZEROSHOT_FIX, remedy
from ebft_engine.zeroshot import harness, placed, without_kv_cache

T4 = 15 * GiB
CUDA_FP16 = Precision(torch.device("cuda"), torch.float16, torch.float16)  # a T4: no native bf16
LLAMA_3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
LLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       vocab_size=32000, max_position_embeddings=2048)
TASKS = {"eval.zeroshot": "boolq,hellaswag"}


@pytest.fixture
def paper():
    return RunConfig.from_yaml("assets/presets/llama-7b-paper.yaml")


def test_the_whole_model_goes_to_the_device_only_when_it_fits_beside_the_batch():
    budget = int(T4 * DEVICE_HEADROOM)
    assert zeroshot_placement(budget - GiB, T4, GiB) == "device"  # exactly at the headroom: fits
    assert zeroshot_placement(budget - GiB + 1, T4, GiB) == "offload"
    assert zeroshot_placement(10 * T4, None, GiB) == "device"  # capacity unknown (a CPU run): as before
    llama_3 = Shape.of(LLAMA_3_8B).params * 2  # 14.96 GiB in float16: more than a T4 gives with any batch
    assert zeroshot_placement(llama_3, T4, 0) == "offload"
    assert zeroshot_placement(llama_3, 40 * GiB, zeroshot_batch_bytes(Shape.of(LLAMA_3_8B), CUDA_FP16)) == "device"


def test_a_zeroshot_phase_is_planned_only_when_tasks_are_set(paper):
    plain = plan_memory(LLAMA_7B, paper, CUDA_FP16, device_capacity=T4)
    assert "zeroshot" not in {p.phase for p in plain.phases} and plain.zeroshot is None
    scored = plan_memory(LLAMA_7B, paper.with_overrides(TASKS), CUDA_FP16, device_capacity=T4)
    assert scored.phase("zeroshot") and scored.zeroshot in ("device", "offload")
    assert [p.phase for p in scored.phases if p.phase != "zeroshot"] == [p.phase for p in plain.phases]


def test_offloaded_zeroshot_holds_one_block_beside_the_batch_not_the_whole_model(paper):
    """Llama-3-8B on a T4: the whole model cannot go to the device, so the blocks stream; the device holds what
    lies outside the blocks (embeddings, head, final norm), one block's weights and lm-eval's batch."""
    shape, config = Shape.of(LLAMA_3_8B), paper.with_overrides(TASKS)
    plan = plan_memory(LLAMA_3_8B, config, CUDA_FP16, device_capacity=T4)
    phase, batch = plan.phase("zeroshot"), zeroshot_batch_bytes(shape, CUDA_FP16)
    outside = (shape.params - shape.layers * shape.block_params) * 2
    assert plan.zeroshot == "offload" and "blocks offloaded to the host" in plan.summary()
    assert phase.device == outside + shape.block_params * 2 + batch and phase.parts["lm-eval batch"] == batch
    assert phase.parts["weights"] < shape.params * 2 / 6  # 2.36 GiB of weights, not the whole model's 14.96
    assert batch > 8 * 1024 * shape.vocab * (2 + 4)  # the batch's fp16 logits and their float32 log-softmax
    assert phase.host == plan.phase("prune").host  # the model stays on the host, with nothing added
    assert plan.fits  # a 16 GB card scores Llama-3-8B
    big = plan_memory(LLAMA_3_8B, config, CUDA_FP16, device_capacity=80 * GiB)
    assert big.zeroshot == "device" and big.phase("zeroshot").device == shape.params * 2 + batch
    cpu = plan_memory(LLAMA_3_8B, config, Precision(torch.device("cpu"), torch.bfloat16, torch.bfloat16))
    assert cpu.phase("zeroshot").device == 0 and cpu.phase("zeroshot").host > shape.params * 2


def test_a_device_too_small_even_to_stream_is_told_to_drop_zeroshot_not_to_shrink_ebft(paper):
    config = paper.with_overrides({**TASKS, "ebft.epochs": 0})
    plan = plan_memory(LLAMA_3_8B, config, CUDA_FP16, device_capacity=8 * GiB)
    assert not plan.fits and "the zeroshot phase" in plan.problem
    assert remedy(plan, LLAMA_3_8B, config, CUDA_FP16) == ZEROSHOT_FIX


PAIRS = [("The sky is", " blue"), ("Fire is", " hot"), ("Water is wet and", " ice is cold"), ("A", " b c d e")]


def _log_likelihoods(model, offload: bool) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    blocks = model.model.layers
    with placed(model, blocks, "cpu", offload=offload), without_kv_cache(model):
        streamed = [p.device.type == "meta" for p in blocks.parameters()]
        assert all(streamed) if offload else not any(streamed)  # offloaded: the weights arrive as each layer runs
        return [ll for ll, _greedy in harness(model, byte_tokenizer()).loglikelihood(requests)]


def test_offloaded_scoring_gives_the_plain_log_likelihoods_and_hands_the_model_back(tiny_llama):
    """accelerate's hooks with an execution device of cpu: the blocks' weights are off the model (meta) while
    lm-eval runs and reach each layer as it runs; the scores are the plain path's to the last bit."""
    params = dict(tiny_llama.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = tiny_llama(ids).logits
    plain = _log_likelihoods(tiny_llama, offload=False)
    assert len(set(plain)) == len(plain) and all(ll < 0 for ll in plain)
    assert _log_likelihoods(tiny_llama, offload=True) == plain
    after = dict(tiny_llama.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)  # the same objects
    assert all(torch.equal(after[n], values[n]) and after[n].device.type == "cpu" for n in params)
    for m in tiny_llama.modules():  # no hook, no patched forward left behind
        assert not hasattr(m, "_hf_hook") and not hasattr(m, "_old_forward") and "forward" not in vars(m)
    assert torch.equal(tiny_llama(ids).logits, logits)


def test_the_model_is_handed_back_when_scoring_fails(tiny_llama):
    params = dict(tiny_llama.named_parameters())
    with pytest.raises(RuntimeError, match="lm-eval failed"):
        with placed(tiny_llama, tiny_llama.model.layers, "cpu", offload=True):
            raise RuntimeError("lm-eval failed")
    assert all(p is params[n] and p.device.type == "cpu" for n, p in tiny_llama.named_parameters())
    assert not any(hasattr(m, "_hf_hook") for m in tiny_llama.modules())


def test_lm_eval_forward_builds_no_kv_cache_and_the_setting_comes_back(tiny_llama):
    ids = torch.randint(0, 256, (1, 8))
    assert tiny_llama(ids).cache is not None  # transformers' default: a cache nobody reads while scoring
    with without_kv_cache(tiny_llama):
        assert tiny_llama(ids).cache is None
    assert tiny_llama.config.use_cache is True
