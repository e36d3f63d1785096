"""The memory estimate's parts, each checked against the thing itself: the trained elements against a
real optimizer in the same assignment, the traced activations on the meta device against the same
trace on real tensors, the gradient and moment bytes against their definition; and an 8B config
plans on the meta device without allocating it."""
from __future__ import annotations

import time

import pytest
import torch

from adaptopt import AdaptiveOptimizer, Mode
from adaptopt.training.estimate import estimate_memory, plan_table
from adaptopt.training.memory import saved_activation_bytes
from tests.tiny_models import tiny_llama, transformers

PARTIAL_PLAN = {"method": "scheduled", "plan": {0: {"model.layers.0.mlp.up_proj": "full",
                                                    "model.layers.1.self_attn.q_proj": "frozen"}}}


@pytest.mark.parametrize("policy", ["full", "lora", "topk", "bitfit", "frozen", PARTIAL_PLAN])  # a plan names
def test_trained_elements_and_optimizer_bytes_match_a_real_optimizer(policy):  # two layers: the rest stay LoRA
    estimate = estimate_memory(tiny_llama(layers=3), policy, batch_size=2, seq_len=8, rank=4)
    opt = AdaptiveOptimizer(tiny_llama(layers=3), lr=1e-3, policy=policy, rank=4)
    assert estimate.trained_elements == opt.trainable_parameter_count()
    assert estimate.gradients == 4 * estimate.trained_elements and estimate.optimizer == 2 * estimate.gradients
    assert estimate.weights >= sum(p.numel() * 4 for p in tiny_llama(layers=3).parameters())  # + the factors


def test_adaptive_policies_are_estimated_at_their_largest_assignment():
    model = tiny_llama(layers=4)
    by_policy = {p: estimate_memory(model, p, 2, 8, rank=4) for p in ("lora", "hybrid", "lisa", "badam", "full")}
    trained = {p: e.trained_elements for p, e in by_policy.items()}
    assert trained["lora"] < trained["hybrid"] < trained["full"]
    opt = AdaptiveOptimizer(tiny_llama(layers=4), lr=1e-3, policy="hybrid", rank=4)
    full_blocks = {"model.layers.0", "model.layers.1"}  # Hybrid's t=33 of 4 blocks: two FULL
    opt.apply({n: Mode.FULL for n, m in opt.layers.items() if m.target.block_name in full_blocks})
    assert by_policy["hybrid"].trained_elements == opt.trainable_parameter_count()  # blocks are alike here
    assert by_policy["badam"].trained_elements < by_policy["lisa"].trained_elements  # LISA trains embeddings too


def test_the_meta_trace_counts_what_a_real_forward_saves():
    """The activation bytes traced on the meta device equal those of the same forward on real tensors."""
    torch.manual_seed(0)
    real = tiny_llama(layers=2)
    AdaptiveOptimizer(real, lr=1e-3, policy="lora", rank=4)
    import copy
    meta = copy.deepcopy(real).to("meta")
    on_meta, logits_meta = saved_activation_bytes(meta, 2, 8, torch.device("meta"))
    on_cpu, logits_cpu = saved_activation_bytes(real, 2, 8, torch.device("cpu"))
    assert on_meta == on_cpu > 0 and logits_meta == logits_cpu == 2 * 8 * real.config.vocab_size


def test_an_8b_config_plans_in_seconds_without_allocating_it():
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    table = {p: estimate_memory(model, p, 1, 1024, dtype=torch.bfloat16, rank=16) for p in ("full", "lora")}
    assert time.perf_counter() - start < 120  # seconds, on a loaded 2-core machine; ~2 s when quiet
    full, lora = table["full"], table["lora"]
    assert 7.9e9 < full.trained_elements < 8.1e9 and 15.5e9 < full.weights < 16.5e9  # 8.03B bf16 parameters
    assert full.gradients == 2 * full.trained_elements and lora.trained_elements < 0.01 * full.trained_elements
    assert "| full |" in plan_table(table)


@pytest.mark.parametrize("policy", ["lora", "full"])
def test_an_autocast_step_is_estimated_near_what_autocast_saves(policy):
    """Activations under ``autocast=bfloat16`` (traced in bf16, plus the cast copies of the multiplied
    matrices) against the same forward run under ``torch.autocast`` on real CPU tensors: within 15%
    here (autocast keeps norms and the softmax in float32, which the bf16 trace does not see); and
    below the float32 estimate, with the weights and optimizer states unchanged."""
    torch.manual_seed(0)
    model = tiny_llama(layers=3)
    model.config._attn_implementation = "eager"
    amp = estimate_memory(model, policy, 4, 64, rank=4, autocast=torch.bfloat16)
    fp32 = estimate_memory(model, policy, 4, 64, rank=4)
    AdaptiveOptimizer(model, lr=1e-3, policy=policy, rank=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real, _ = saved_activation_bytes(model, 4, 64, torch.device("cpu"))
    assert abs(amp.activations - real) <= 0.15 * real
    assert amp.activations < fp32.activations
    assert (amp.weights, amp.gradients, amp.optimizer) == (fp32.weights, fp32.gradients, fp32.optimizer)
