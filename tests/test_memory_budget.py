"""Memory budgets: a policy never plans beyond its budget and spends it (properties over block sizes,
ranks and limits, on made-up costs); the cost the optimizer plans with equals the bytes a real step
holds; a limit below LoRA's or a policy that starts above it is refused by name, leaving the model
as it was; decisions of a policy that does not spend budgets are cut to fit."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptopt import LISA, AdaptiveOptimizer, AutoMode, BAdam, Hybrid, LoRALinear, MemoryBudget, Mode
from adaptopt.policies.base import Budget, LayerDecision, LayerView, Policy
from adaptopt.training.budget import parse_limit
from adaptopt.training.memory import peak_bytes, state_bytes, traced_activations
from tests.tiny_models import tiny_llama, token_batch

TYPES = ("q", "v", "mlp")


def made_up(block_widths, rank):
    """Views of blocks whose layers have the given widths, and a cost in the optimizer's units: a
    FULL layer adds 3 copies of its weight (gradient, two moments), a LoRA layer 4 of its factors."""
    views = {}
    for b, width in enumerate(block_widths):
        for t in TYPES:
            name = f"model.layers.{b}.{t}"
            views[name] = LayerView(name, f"model.layers.{b}", b, t, Mode.LORA, rank, 1.0, width, 2 * width, False)

    def cost(modes):
        total = 1000
        for name, (mode, r) in modes.items():
            v = views[name]
            total += {Mode.FULL: 3 * v.in_features * v.out_features,
                      Mode.LORA: 4 * r * (v.in_features + v.out_features), Mode.FROZEN: 0}[mode]
        return total
    return views, cost


def frozen_views(views):
    return {n: dataclasses.replace(v, mode=Mode.FROZEN) for n, v in views.items()}


def blocks_in(decisions, mode):
    return {name.rsplit(".", 1)[0] for name, d in decisions.items() if d.mode is mode}


widths = st.lists(st.integers(16, 64), min_size=2, max_size=10)  # FULL costs more than LoRA, as in real models


@settings(max_examples=60, deadline=None)
@given(widths=widths, rank=st.integers(1, 8), share=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_hybrid_and_automode_never_plan_beyond_their_budget_and_spend_it(widths, rank, share, seed):
    views, cost = made_up(widths, rank)
    lora = cost({n: (Mode.LORA, rank) for n in views})
    full = cost({n: (Mode.FULL, rank) for n in views})
    budget = Budget(int(lora + share * (full - lora)), cost)
    gen = torch.Generator().manual_seed(seed)
    scores = {n: {"grad_norm": float(torch.rand((), generator=gen))} for n in views}
    for policy in (Hybrid(freeze_prefix=0), Hybrid(freeze_at=None), AutoMode(u=1)):
        policy.memory_budget = budget
        decisions = policy.decide(views, scores, 20, 10)
        assert budget.fits(views, decisions), policy
        if policy.freeze_prefix if isinstance(policy, Hybrid) else False:
            continue  # the frozen prefix only lowers the cost; "spent" is checked without it
        full_blocks = blocks_in(decisions, Mode.FULL)
        for block in {v.block_name for v in views.values()} - full_blocks:  # spent: no other block fits
            more = {n: LayerDecision(Mode.FULL) if v.block_name == block else decisions[n] for n, v in views.items()}
            assert not budget.fits(views, more), (policy, block)


@settings(max_examples=60, deadline=None)
@given(widths=widths, share=st.floats(0, 1), index=st.integers(0, 40))
def test_lisa_and_badam_draw_as_many_blocks_as_always_fit(widths, share, index):
    views, cost = made_up(widths, 2)
    views = frozen_views(views)
    least = cost(dict.fromkeys(views, (Mode.FROZEN, 2)))
    largest = max(3 * (w * 2 * w) * len(TYPES) for w in widths)
    budget = Budget(int(least + largest + share * (cost(dict.fromkeys(views, (Mode.FULL, 2))) - least - largest)),
                    cost)
    for policy in (LISA(gamma=1), LISA(weighted=True), BAdam(), BAdam(order="random")):
        policy.memory_budget = budget
        decisions = policy.decide(views, {n: {"grad_norm": 1.0} for n in views}, policy.period * index, None)
        assert budget.fits(views, decisions), policy
        width = len(blocks_in(decisions, Mode.FULL))
        assert width >= 1
        sizes = sorted(widths, reverse=True)[:policy.width(policy.blocks(views), views) + 1]
        if len(sizes) > policy.width(policy.blocks(views), views):  # one block more, the largest: too much
            more = least + sum(3 * w * 2 * w * len(TYPES) for w in sizes)
            assert more > budget.limit


def test_badam_windows_cover_every_block_once_per_pass():
    views, cost = made_up([8] * 7, 2)
    views = frozen_views(views)
    policy = BAdam(period=1)
    policy.memory_budget = Budget(cost(dict.fromkeys(views, (Mode.FROZEN, 2))) + 3 * (3 * 8 * 16 * 3) + 10, cost)
    windows = [sorted(blocks_in(policy.decide(views, {}, i, None), Mode.FULL)) for i in range(3)]
    assert [len(w) for w in windows] == [3, 3, 1]
    assert sorted(sum(windows, [])) == sorted({v.block_name for v in views.values()})
    assert windows[0] == ["model.layers.4", "model.layers.5", "model.layers.6"]  # descending: the last blocks first


@pytest.mark.parametrize("text, parsed", [("24GB", ("bytes", 24e9)), ("1.5 GiB", ("bytes", 1.5 * 2**30)),
                                          ("1.3x", ("times", 1.3)), (1.3, ("times", 1.3)), (10**9, ("bytes", 1e9)),
                                          ("lora+25%", ("gap", 0.25)), ("LoRA + 10 %", ("gap", 0.1))])
def test_limits_are_read_in_every_form(text, parsed):
    kind, value = parse_limit(text)
    assert kind == parsed[0] and math.isclose(value, parsed[1])


@pytest.mark.parametrize("bad", ["lots", "-1GB", 0, True, "25%", None])
def test_unreadable_limits_are_refused_naming_the_forms(bad):
    with pytest.raises(ValueError, match="memory_budget: expected bytes"):
        parse_limit(bad)


def test_the_planned_cost_is_the_bytes_a_real_step_holds():
    """The weights and gradients the budget counts from shapes alone equal those a real run holds after
    a step, summed from the tensors, and AdamW's state is two moments per gradient; the cost is the
    peak formula over them (no activations named: the model's states only)."""
    torch.manual_seed(0)
    model = tiny_llama(layers=4).train()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Hybrid(calibration_steps=1, freeze_prefix=0), rank=4,
                            memory_budget="lora+40%")
    for i in range(2):
        tokens = token_batch(seed=i)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    assert {m.mode for m in opt.layers.values()} == {Mode.FULL, Mode.LORA}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    planned = state_bytes(model, opt.layers, opt.rules, {n: m.layout() for n, m in opt.layers.items()})
    largest = max(sum(p.numel() * p.element_size() for p in g["params"]) for g in opt.param_groups)
    assert planned == (weights, grads, largest, opt.trainable_parameter_count()) and moments == 2 * grads
    assert opt.policy.memory_budget.cost_of(opt.views(), {}) == peak_bytes(weights, grads, 0, largest)
    assert peak_bytes(weights, grads, 0, largest) <= opt.memory_budget.limit


def test_a_budget_below_loras_is_refused_with_the_numbers_and_the_model_is_unchanged():
    model = tiny_llama(layers=2)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"below what LoRA needs for this model .*GB \(Full: .*GB\)"):
        AdaptiveOptimizer(model, lr=1e-3, memory_budget="0.9x")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(ValueError, match="policy 'full' starts with an assignment that needs"):
        AdaptiveOptimizer(tiny_llama(layers=2), lr=1e-3, policy="full", memory_budget="lora+50%")
    with pytest.raises(ValueError, match="batch_size and seq_len together"):
        MemoryBudget("1.2x", batch_size=4)


class PromoteAll(Policy):
    """A policy that does not spend budgets: at step 1 every layer FULL."""

    method = "promote-all-test"

    def initial(self, layers, scores):
        return {n: LayerDecision(Mode.LORA) for n in layers}

    def is_decision_step(self, step, steps_per_epoch):
        return step == 1

    def decide(self, layers, scores, step, steps_per_epoch):
        return {n: LayerDecision(Mode.FULL) for n in layers}


def test_a_policy_that_does_not_spend_budgets_is_cut_to_fit_with_a_warning():
    model = tiny_llama(layers=3).train()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=PromoteAll(), rank=4, memory_budget="lora+50%")
    tokens = token_batch()
    model(input_ids=tokens, labels=tokens).loss.backward()
    with pytest.warns(UserWarning, match="above memory_budget .* dropped, last first"):
        opt.step()
    modes = [m.mode for m in opt.layers.values()]
    assert Mode.FULL in modes and Mode.LORA in modes
    assert opt.policy.memory_budget.fits(opt.views(), {})
    full = [n for n, m in opt.layers.items() if m.mode is Mode.FULL]
    assert full == list(opt.layers)[:len(full)]  # the last decisions were the ones dropped


def test_activations_count_when_the_budget_names_its_step():
    """The same limit in bytes buys more FULL layers when it covers the model's states only than when
    the activations of a named step count against it too."""
    def full_layers(budget):
        torch.manual_seed(0)
        model = tiny_llama(layers=4).train()
        opt = AdaptiveOptimizer(model, lr=1e-3, policy=Hybrid(calibration_steps=1, freeze_prefix=0), rank=4,
                                memory_budget=budget)
        tokens = token_batch()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        return opt, sum(m.mode is Mode.FULL for m in opt.layers.values())

    with_step, n_step = full_layers(MemoryBudget("lora+30%", 8, 64))
    activations = traced_activations(with_step.model, with_step.layers, 8, 64)
    assert with_step.memory_budget.activations == activations > 0
    states_only, n_states = full_layers(with_step.memory_budget.limit)
    assert states_only.memory_budget.activations == 0
    assert states_only.memory_budget.limit == with_step.memory_budget.limit
    assert n_states > n_step


def test_a_budget_that_fits_no_sampled_block_is_refused_by_name():
    views, cost = made_up([16, 16, 16], 2)
    views = frozen_views(views)
    for policy in (LISA(), BAdam()):
        policy.memory_budget = Budget(cost(dict.fromkeys(views, (Mode.FROZEN, 2))) + 10, cost)
        with pytest.raises(ValueError, match=rf"{type(policy).__name__}: memory_budget .* fits no block: training "
                                             r"the largest one needs"):
            policy.initial(views, {})
