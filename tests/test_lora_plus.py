"""LoRA+: each layer's B trains in a group of its own at ratio × lora_lr; A at lora_lr."""
from __future__ import annotations

import copy

import pytest
import torch

from adaptopt import AdaptiveOptimizer, Mode
from tests.tiny_models import tiny_llama, token_batch


def step(model, opt, seed=0):
    tokens = token_batch(seed=seed)
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    opt.zero_grad()


def test_b_trains_at_the_ratio_and_a_at_lora_lr_by_an_adamw_computed_apart():
    torch.manual_seed(0)
    model = tiny_llama()
    opt = AdaptiveOptimizer(model, lr=1e-3, lora_lr=1e-2, lora_plus_ratio=16, rank=2, policy="lora")
    step(model, opt)  # B leaves zero: its gradient is no longer degenerate
    reference = copy.deepcopy(model)
    layer = next(iter(opt.layers))
    a, b = (model.get_parameter(f"{layer}.lora_{x}") for x in "AB")
    # the same next step by plain AdamWs: one at lora_lr for A, one at 16 × lora_lr for B
    ref_a, ref_b = (reference.get_parameter(f"{layer}.lora_{x}") for x in "AB")
    state = {p: opt.state[p] for p in (a, b)}
    tokens = token_batch(seed=1)
    reference(input_ids=tokens, labels=tokens).loss.backward()
    for ref, lr, own in ((ref_a, 1e-2, a), (ref_b, 1.6e-1, b)):
        adamw = torch.optim.AdamW([ref], lr=lr, weight_decay=opt.defaults["weight_decay"])
        adamw.state[ref] = copy.deepcopy(state[own])
        adamw.step()
    step(model, opt, seed=1)
    torch.testing.assert_close(a, ref_a, rtol=0, atol=1e-7)
    torch.testing.assert_close(b, ref_b, rtol=0, atol=1e-7)


def test_b_keeps_its_group_through_transitions_and_checkpoints():
    torch.manual_seed(0)
    model = tiny_llama()
    opt = AdaptiveOptimizer(model, lr=1e-3, lora_lr=1e-2, lora_plus_ratio=4, rank=2)
    layer = next(iter(opt.layers))
    opt.apply({layer: Mode.FULL})
    opt.apply({layer: Mode.LORA})
    b = model.get_parameter(f"{layer}.lora_B")
    group = next(g for g in opt.param_groups if any(p is b for p in g["params"]))
    assert group["lr"] == pytest.approx(4e-2) and len(group["params"]) == 1
    step(model, opt)
    fresh = tiny_llama()
    again = AdaptiveOptimizer(fresh, lr=1e-3, lora_lr=1e-2, lora_plus_ratio=4, rank=2)  # built the same way
    fresh.load_state_dict(model.state_dict())
    again.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]
    plain = AdaptiveOptimizer(tiny_llama(), lr=1e-3, rank=2)
    with pytest.raises(ValueError, match="parameter groups differ"):
        plain.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="lora_plus_ratio must be"):
        AdaptiveOptimizer(tiny_llama(), lora_plus_ratio=0)
