"""Statistics hooks: armed only on requested steps, exact against autograd, removable."""
from __future__ import annotations

import pytest
import torch

from adaptopt import AdaptiveOptimizer, Hybrid, Mode, Policy
from adaptopt.training.layer_stats import StatsCollector
from tests.tiny_models import tiny_bert, token_batch

LABELS = torch.tensor([0, 1])


class EveryThirdStep(Policy):
    """Collects statistics on steps 3, 6, ... and decides right after them (records scores only)."""

    method = "every_third"

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def initial(self, layers, scores):
        from adaptopt import LayerDecision
        return {name: LayerDecision(Mode.FROZEN if "layer.0" in name else Mode.LORA) for name in layers}

    def wants_stats(self, step, steps_per_epoch):
        return step % 3 == 0

    def is_decision_step(self, step, steps_per_epoch):
        return step % 3 == 0

    def decide(self, layers, scores, step, steps_per_epoch):
        self.seen.append({"step": step, "scores": {k: dict(v) for k, v in scores.items()}})
        return {}


def test_hooks_are_armed_only_on_requested_steps_and_score_every_layer():
    torch.manual_seed(0)
    model = tiny_bert()
    policy = EveryThirdStep()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=policy, rank=2)
    armed = []
    for i in range(6):
        armed.append(opt.collector.armed)
        model(input_ids=token_batch(seed=i), labels=LABELS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert armed == [False, False, True, False, False, True]
    assert [s["step"] for s in policy.seen] == [3, 6]
    scores = policy.seen[-1]["scores"]
    assert set(scores) == set(opt.layers)  # frozen layer-0 targets are scored too
    assert all(v["grad_norm"] > 0 and v["act_rms"] > 0 for v in scores.values())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in opt.layers.values())


def test_grad_norm_equals_the_full_weight_gradient_in_any_mode():
    """‖δᵀx‖_F from the hooks equals the norm of the gradient autograd gives a FULL weight."""
    torch.manual_seed(0)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="full", train_other=True)
    tokens = token_batch()
    model(input_ids=tokens, labels=LABELS).loss.backward()
    reference = {name: float(m.weight.grad.norm()) for name, m in opt.layers.items()}
    opt.zero_grad()
    opt.apply({name: Mode.FROZEN for name in opt.layers})  # nothing in the targets trains now
    collector = StatsCollector(opt.layers)
    collector.arm()
    model(input_ids=tokens, labels=LABELS).loss.backward()
    collector.disarm()
    measured = collector.scores()
    for name, expected in reference.items():
        assert abs(measured[name]["grad_norm"] - expected) <= 1e-4 * expected, name
    x_rms = None  # act_rms is the RMS of the layer input: check one layer by hand
    layer = opt.layers["bert.encoder.layer.0.attention.self.query"]
    captured = []
    handle = layer.register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=tokens)
    handle.remove()
    x_rms = float(captured[0].float().square().mean().sqrt())
    assert abs(measured["bert.encoder.layer.0.attention.self.query"]["act_rms"] - x_rms) < 1e-5 * x_rms


def test_evaluation_passes_while_armed_are_not_counted():
    """An eval pass (model.eval() or no_grad) between training steps leaves the sums untouched."""
    torch.manual_seed(0)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="lora", rank=2)
    collector = StatsCollector(opt.layers)
    collector.arm()
    model(input_ids=token_batch(), labels=LABELS).loss.backward()
    before = collector.state_dict()
    model.eval()
    model(input_ids=token_batch(seed=1), labels=LABELS).loss.backward()
    model.train()
    with torch.no_grad():
        model(input_ids=token_batch(seed=2))
    assert collector.state_dict() == before
    model(input_ids=token_batch(seed=3), labels=LABELS).loss.backward()
    assert all(collector.stats[n].batches == 2 for n in opt.layers)
    collector.disarm()


@pytest.mark.parametrize("moves", [[Mode.FULL], [Mode.FULL, Mode.LORA]])
def test_a_layer_moved_by_hand_while_scoring_is_scored_in_its_new_mode(moves):
    """A manual transition replaces the tensors the cheap score hooks (new factors, a weight that now
    trains); the next scored step must read the new ones, or the decision finds the layer unscored."""
    torch.manual_seed(0)
    model = tiny_bert().train()
    opt = AdaptiveOptimizer(model, lr=1e-3, rank=2, policy=Hybrid(calibration_steps=1, freeze_prefix=0))
    layer = next(iter(opt.layers))
    for mode in moves:
        opt.apply({layer: mode})
    model(input_ids=token_batch(), labels=LABELS).loss.backward()
    opt.step()  # the decision: it needs every layer's score
    assert opt.scores[layer]["grad_norm"] > 0
