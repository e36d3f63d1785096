"""Cheap gradient importance (adaptopt.training.gradient_probes) against the exact ‖δᵀx‖_F: exact for
FULL layers, unbiased for LoRA layers with a random A and for probed frozen layers, per
optimizer step whatever the micro-batch split, and ranking layers like the exact score."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from adaptopt import AdaptiveOptimizer, Fixed, LoRALinear, Mode
from adaptopt.training.layer_stats import StatsCollector
from tests.helpers import spearman
from tests.tiny_models import tiny_bert, token_batch

LABELS = torch.tensor([0, 1, 1, 0])


def one_layer(mode: Mode, seed: int) -> tuple[nn.Module, LoRALinear]:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(12, 10), rank=3, alpha=6, mode=mode)
    if mode is Mode.LORA:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3)
    return nn.Sequential(nn.Linear(12, 12), nn.Tanh(), layer), layer


def step_scores(model, layer, x, target, micro_batches: int, gradient: str, seed: int = 0) -> float:
    collector = StatsCollector({"l": layer}, gradient=gradient, activations=False)
    collector.reset(window_seed=seed)
    collector.arm()
    for xb, tb in zip(x.chunk(micro_batches), target.chunk(micro_batches)):
        ((model(xb) - tb).square().sum() / len(x)).backward()
    collector.observe_step()
    collector.disarm()
    for p in model.parameters():
        p.grad = None
    return collector.scores()["l"]["grad_norm"]


def full_gradient_norm(model, layer, x, target) -> float:
    """‖G‖_F of the layer's full weight for the whole step, computed another way (autograd
    through a FULL copy of the layer)."""
    weight = (layer.effective_weight()).clone().requires_grad_(True)
    h = model[1](model[0](x))
    y = nn.functional.linear(h, weight, layer.bias)
    ((y - target).square().sum() / len(x)).backward()
    for p in model.parameters():
        p.grad = None
    return float(weight.grad.norm())


@given(seed=st.integers(0, 10_000), micro=st.sampled_from([1, 2, 4]))
def test_a_full_layer_scores_its_exact_step_gradient_whatever_the_split(seed, micro):
    model, layer = one_layer(Mode.FULL, seed)
    x, target = torch.randn(8, 12), torch.randn(8, 10)
    expected = full_gradient_norm(model, layer, x, target)
    assert step_scores(model, layer, x, target, micro, "cheap") == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("mode, gradient", [(Mode.LORA, "cheap"), (Mode.LORA, "probed"), (Mode.FROZEN, "cheap")])
def test_lora_and_probe_estimates_are_unbiased(mode, gradient):
    """Averaged over random A (LoRA) or random probes (frozen), ĝ² ≈ ‖G‖²."""
    x, target = torch.randn(16, 12), torch.randn(16, 10)
    estimates, truth = [], []
    for seed in range(300):
        model, layer = one_layer(mode, 0 if mode is Mode.FROZEN else seed)
        if mode is Mode.LORA:
            with torch.no_grad():  # a fresh random A each draw, the same function
                layer.lora_B.zero_()
        truth.append(full_gradient_norm(model, layer, x, target) ** 2)
        estimates.append(step_scores(model, layer, x, target, 1, gradient, seed=seed) ** 2)
    # unbiased: the mean paired error is within 4 standard errors of 0 (a z-test over 300 draws; the
    # draws are seeded, so the test is deterministic, and 4σ leaves ~6e-5 for a chance failure)
    errors = [e - t for e, t in zip(estimates, truth)]
    standard_error = statistics.stdev(errors) / math.sqrt(len(errors))
    assert abs(statistics.fmean(errors)) <= 4 * standard_error
    assert standard_error < 0.1 * statistics.fmean(truth)  # and precise enough for that to mean something


@given(seed=st.integers(0, 10_000))
def test_probe_and_lora_scores_do_not_depend_on_the_micro_batch_split(seed):
    for mode, gradient in ((Mode.LORA, "cheap"), (Mode.LORA, "probed"), (Mode.FROZEN, "cheap")):
        model, layer = one_layer(mode, seed)
        x, target = torch.randn(8, 12), torch.randn(8, 10)
        whole = step_scores(model, layer, x, target, 1, gradient, seed=seed)
        split = step_scores(model, layer, x, target, 4, gradient, seed=seed)
        assert split == pytest.approx(whole, rel=1e-4)


def test_cheap_scores_rank_layers_like_the_exact_score_on_a_tiny_model():
    torch.manual_seed(0)
    model = tiny_bert(layers=4, dropout=0.0).train()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Fixed({r"layer\.1": "full", r"layer\.3": "frozen"},
                                                         default=("lora", 4)), rank=4)
    with torch.no_grad():
        for m in opt.layers.values():
            if m.mode is Mode.LORA:
                m.lora_B.normal_(0, 0.05)
    cheap = StatsCollector(opt.layers, gradient="cheap", activations=False)
    exact = StatsCollector(opt.layers, gradient="exact", activations=False)
    cheap.arm()
    exact.arm()
    for i in range(8):
        model(input_ids=token_batch(batch=4, seed=i), labels=LABELS).loss.backward()
        cheap.observe_step()
        opt.zero_grad()
    c, e = cheap.scores(), exact.scores()
    names = list(opt.layers)
    assert {opt.layers[n].mode for n in names} == {Mode.FULL, Mode.LORA, Mode.FROZEN}
    assert spearman([c[n]["grad_norm"] for n in names], [e[n]["grad_norm"] for n in names]) >= 0.8


def test_automode_scores_cheaply_by_default_and_exactly_on_request():
    from adaptopt import AutoMode
    from adaptopt.policies.base import Statistics
    assert AutoMode().statistics() == Statistics("cheap", False, True)
    assert AutoMode(score="exact").statistics() == Statistics("exact", False, True)
    assert AutoMode(freeze_from=2).statistics() == Statistics("cheap", False, False)  # frozen units unhooked
    with pytest.raises(ValueError, match="score must be"):
        AutoMode(score="fast")
