"""Progressive freezing (AutoMode's freeze schedule) and calibrate-then-fix (Hybrid): they
decide what they say, never freeze every unit, and a frozen prefix gets no backward pass."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptopt import AdaptiveOptimizer, AutoMode, Hybrid, Mode
from adaptopt.policies.base import LayerView
from tests.tiny_models import tiny_bert, token_batch

LABELS = torch.tensor([0, 1])


def views(blocks: int, modes=None) -> dict[str, LayerView]:
    out = {}
    for b in range(blocks):
        for t in ("q", "v"):
            name = f"enc.layer.{b}.{t}"
            out[name] = LayerView(name, f"enc.layer.{b}", b, t, (modes or {}).get(b, Mode.LORA), 4, 1.0, 8, 8, False)
    return out


@pytest.mark.parametrize("step, percent, cap, expected", [
    (20, 50, 99, [0, 0, 3, 6, 6, 6]),       # from decision 3: 50 % of 6 units, then 100 % capped to 5
    (10, 20, 50, [0, 0, 2, 3, 3, 3]),       # ⌈6·p/100⌉ units: 20 % of 6 is 2
])
def test_the_freeze_schedule_freezes_what_it_says_and_never_everything(step, percent, cap, expected):
    policy = AutoMode(freeze_from=3, freeze_step=percent, freeze_max=cap)
    counts = [policy.frozen_count(d, 6) for d in range(1, 7)]
    assert counts == [min(c, 5) for c in expected]
    assert all(c < 6 for c in counts)


def test_progressive_freezing_retires_a_growing_prefix_and_keeps_it():
    policy = AutoMode(u=2, t=20, freeze_from=1, freeze_step=20, freeze_max=60, freeze_order="prefix")
    spe, modes = 10, {}
    importance = {0: 5.0, 1: 4.0, 2: 1.0, 3: 3.0, 4: 2.0}
    for decision, step in enumerate((5, 10, 15, 20), start=1):
        layer_views = views(5, modes)
        scores = {n: {"grad_norm": importance[v.block_index]} for n, v in layer_views.items()
                  if v.mode is not Mode.FROZEN}  # frozen units are never scored again
        decided = policy.decide(layer_views, scores, step, spe)
        modes = {v.block_index: decided[n].mode for n, v in layer_views.items()}
        frozen = sorted(b for b, m in modes.items() if m is Mode.FROZEN)
        assert frozen == list(range(min(decision, 3)))  # 20 % per decision, capped at 60 %: a prefix
        full = [b for b, m in modes.items() if m is Mode.FULL]
        assert len(full) == 1 and full[0] == max((b for b in importance if b not in frozen), key=importance.get)


def test_importance_order_freezes_the_least_important():
    policy = AutoMode(u=1, t=20, freeze_from=1, freeze_step=40, freeze_order="importance")
    decided = policy.decide(views(5), {n: {"grad_norm": [5, 4, 1, 3, 2][int(n.split(".")[2])]}
                                       for n in views(5)}, 10, 10)
    assert sorted({int(n.split(".")[2]) for n, d in decided.items() if d.mode is Mode.FROZEN}) == [2, 4]


@pytest.mark.parametrize("kwargs, message", [
    ({"freeze_from": 1, "freeze_max": 100}, "freeze_max must be < 100"),
    ({"freeze_from": 0}, "freeze_from must be a positive int"),
    ({"freeze_from": 1, "bottom": 10}, "do not combine"),
    ({"freeze_order": "random"}, "freeze_order must be one of"),
])
def test_bad_freeze_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoMode(**kwargs)
    with pytest.raises(ValueError, match="freeze_prefix must be < 100"):
        Hybrid(freeze_prefix=100)
    for bad in (5, 1.0, 0.0, -0.5, True, "0.6"):
        with pytest.raises(ValueError, match="freeze_at must be a fraction of the run in .0, 1., a step after "
                                             "calibration_steps=5"):
            Hybrid(calibration_steps=5, freeze_at=bad)


def backward_calls(model, opt, steps: int) -> dict[int, int]:
    """How many times autograd ran through each encoder block, counted by full backward hooks."""
    calls = {i: 0 for i in range(len(model.bert.encoder.layer))}
    handles = [block.register_full_backward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(model.bert.encoder.layer)]
    model.train()
    for s in range(steps):
        model(input_ids=token_batch(seed=s), labels=LABELS).loss.backward()
        opt.step()
        opt.zero_grad()
    for h in handles:
        h.remove()
    return calls


def test_a_frozen_prefix_gets_no_backward_pass():
    torch.manual_seed(0)
    model = tiny_bert(layers=4, dropout=0.0)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Hybrid(t=25, calibration_steps=2, freeze_prefix=50, freeze_at=None),
                            rank=2)
    before = backward_calls(model, opt, 2)  # calibration: all LoRA, every block backpropagated
    assert all(c == 2 for c in before.values())
    modes = {int(n.split(".")[3]): m.mode for n, m in opt.layers.items()}
    frozen = sorted(b for b, m in modes.items() if m is Mode.FROZEN)
    assert frozen and frozen == list(range(len(frozen)))  # a prefix
    after = backward_calls(model, opt, 3)
    assert all(after[b] == 0 for b in frozen) and all(after[b] == 3 for b in modes if b not in frozen)


def test_progressive_freezing_prunes_backward_through_automode_too():
    torch.manual_seed(0)
    model = tiny_bert(layers=4, dropout=0.0)
    opt = AdaptiveOptimizer(model, lr=1e-3, rank=2, steps_per_epoch=4,
                            policy=AutoMode(u=2, t=25, score_steps=2, freeze_from=1, freeze_step=25))
    backward_calls(model, opt, 2)  # first decision: block 0 retired
    assert all(m.mode is Mode.FROZEN for n, m in opt.layers.items() if ".layer.0." in n)
    calls = backward_calls(model, opt, 4)  # scored steps included: the retired prefix is never hooked
    assert calls[0] == 0 and all(calls[b] == 4 for b in (2, 3))


def test_hybrid_decides_once_after_calibration():
    policy = Hybrid(t=33, calibration_steps=5, freeze_prefix=34, freeze_at=None, full_above_prefix=False)
    assert [policy.is_decision_step(s, None) for s in (4, 5, 6)] == [False, True, False]
    assert [policy.wants_stats(s, None) for s in (5, 6)] == [True, False]
    importance = [1.0, 5.0, 2.0, 4.0, 3.0, 0.5]
    decided = policy.decide(views(6), {n: {"grad_norm": importance[int(n.split(".")[2])]} for n in views(6)}, 5, None)
    modes = {int(n.split(".")[2]): d.mode for n, d in decided.items()}
    assert [b for b, m in sorted(modes.items()) if m is Mode.FULL] == [1, 3]
    assert [b for b, m in sorted(modes.items()) if m is Mode.FROZEN] == [0]  # block 1 is FULL: not frozen


def test_hybrid_can_freeze_its_prefix_later_and_backward_stops_from_then_on():
    torch.manual_seed(0)
    model = tiny_bert(layers=4, dropout=0.0)
    policy = Hybrid(t=25, calibration_steps=2, freeze_prefix=50, freeze_at=4)
    assert [policy.is_decision_step(s, None) for s in (1, 2, 3, 4, 5)] == [False, True, False, True, False]
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=policy, rank=2)
    backward_calls(model, opt, 2)
    modes = {int(n.split(".")[3]): m.mode for n, m in opt.layers.items()}
    assert Mode.FROZEN not in modes.values() and list(modes.values()).count(Mode.FULL) == 1  # t=25: one of four
    assert all(c == 2 for c in backward_calls(model, opt, 2).values())  # steps 3-4: the prefix still trains
    after = {int(n.split(".")[3]): m.mode for n, m in opt.layers.items()}
    frozen = sorted(b for b, m in after.items() if m is Mode.FROZEN)
    full = [b for b, m in after.items() if m is Mode.FULL]
    assert full == [b for b, m in modes.items() if m is Mode.FULL]  # the FULL choice is kept
    assert frozen == list(range(len(frozen))) and frozen and all(b < min(full) for b in frozen)
    calls = backward_calls(model, opt, 2)
    assert all(calls[b] == 0 for b in frozen) and all(calls[b] == 2 for b in after if b not in frozen)


@pytest.mark.parametrize("run_steps, expected", [(200, 120), (100, 60), (30, 20), (21, 20)])
def test_hybrid_freezes_its_prefix_at_a_fraction_of_the_run(run_steps, expected):
    policy = Hybrid(calibration_steps=20)  # the defaults: the lowest third, after 60% of the run
    policy.run_steps = run_steps
    assert policy.freeze_step() == expected == max(20, math.ceil(0.6 * run_steps))
    decisions = [s for s in range(1, run_steps + 1) if policy.is_decision_step(s, None)]
    assert decisions == sorted({20, expected})
    layers = views(6)
    importance = {n: {"grad_norm": float(int(n.split(".")[2]))} for n in layers}  # the top blocks matter most
    first = policy.decide(layers, importance, 20, None)
    modes = {int(n.split(".")[2]): d.mode for n, d in first.items()}
    assert [b for b in range(6) if modes[b] is Mode.FULL] == [4, 5]
    assert [b for b in range(6) if modes[b] is Mode.FROZEN] == ([0, 1] if expected == 20 else [])


def test_hybrid_without_the_run_length_warns_and_keeps_its_prefix_training():
    policy = Hybrid(calibration_steps=2, freeze_at=0.5)
    assert policy.freeze_step() is None
    with pytest.warns(UserWarning, match="does not know the run's length, so the prefix will not freeze. "
                                         "Pass total_steps="):
        decided = policy.decide(views(6), {n: {"grad_norm": 1.0} for n in views(6)}, 2, None)
    assert Mode.FROZEN not in {d.mode for d in decided.values()}
    torch.manual_seed(0)
    model = tiny_bert(layers=4, dropout=0.0)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Hybrid(t=25, calibration_steps=2, freeze_prefix=50, freeze_at=0.5),
                            rank=2, total_steps=8)
    backward_calls(model, opt, 3)
    assert Mode.FROZEN not in {m.mode for m in opt.layers.values()}  # ⌈0.5·8⌉ = 4: decided after step 4 ...
    backward_calls(model, opt, 1)
    assert Mode.FROZEN in {m.mode for m in opt.layers.values()}  # ... so frozen from step 5 on
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        opt.set_total_steps(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=2, max_size=12, unique=True),
       st.sampled_from([10.0, 33.0, 50.0, 100.0]), st.sampled_from([0.0, 20.0, 33.0, 60.0]))
def test_full_above_prefix_keeps_the_lowest_units_out_of_full(importance, t, prefix):
    """Reference computed by hand: the bottom ⌈n·p/100⌉ units are never FULL; FULL is the top
    ⌈n·t/100⌉ of the others by importance; the prefix freezes whole (at most all but one unit that is
    not FULL)."""
    n = len(importance)
    policy = Hybrid(t=t, calibration_steps=1, freeze_prefix=prefix, freeze_at=None, full_above_prefix=True)
    decided = policy.decide(views(n), {name: {"grad_norm": importance[int(name.split(".")[2])]} for name in views(n)},
                            1, None)
    modes = {int(name.split(".")[2]): d.mode for name, d in decided.items()}
    bottom = list(range(math.ceil(n * prefix / 100 - 1e-9)))
    above = sorted((b for b in range(n) if b not in bottom), key=lambda b: -importance[b])
    full = sorted(above[:math.ceil(n * t / 100 - 1e-9)])
    assert sorted(b for b, m in modes.items() if m is Mode.FULL) == full
    assert sorted(b for b, m in modes.items() if m is Mode.FROZEN) == bottom[:max(0, n - len(full) - 1)]
    assert all(modes[b] is Mode.LORA for b in range(n) if b not in full and b not in bottom)


def test_full_above_prefix_freezes_the_prefix_the_earlier_rule_gave_up():
    importance = [9.0, 1.0, 2.0, 4.0, 3.0, 0.5]  # the lowest unit scores highest, as SmolLM2's block 0
    scores = {n: {"grad_norm": importance[int(n.split(".")[2])]} for n in views(6)}

    def modes(**kw):
        decided = Hybrid(t=33, calibration_steps=1, freeze_prefix=33, freeze_at=None, **kw).decide(views(6), scores, 1,
                                                                                                  None)
        return [decided[f"enc.layer.{b}.q"].mode.value for b in range(6)]
    assert modes(full_above_prefix=False) == ["full", "lora", "lora", "full", "lora", "lora"]  # no prefix left
    assert modes() == ["frozen", "frozen", "lora", "full", "full", "lora"]                    # the default
    with pytest.raises(ValueError, match="full_above_prefix must be true or false"):
        Hybrid(full_above_prefix="yes")
