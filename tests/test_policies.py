"""Every policy on a tiny model over a few dozen steps: decisions when they should, the
right fraction in each mode, budgets, LR bounds, determinism, building from mappings."""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from adaptopt import (
    AdaptiveOptimizer,
    ALoRS,
    AutoMode,
    BitFit,
    LayerwiseLR,
    LoRA,
    Mode,
    QLoRA,
    QuantLoRALinear,
    RankAllocation,
    Spectrum,
    TopK,
    build_policy,
)
from adaptopt.policies import POLICIES, LayerView, allocate_ranks
from tests.test_scores import _reference_spectrum_snr
from tests.tiny_models import VOCAB, token_batch, transformers

LABELS = torch.tensor([0, 1, 1, 0])


def bert(layers: int = 4, hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def train(model: nn.Module, opt: AdaptiveOptimizer, steps: int, on_step=None, same_batch: bool = False) -> list[float]:
    losses = []
    for i in range(steps):
        loss = model(input_ids=token_batch(4, 9, seed=0 if same_batch else i), labels=LABELS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_step:
            on_step(opt)
    return losses


def modes_by_block(opt: AdaptiveOptimizer) -> dict[int, set[Mode]]:
    out: dict[int, set[Mode]] = {}
    for m in opt.layers.values():
        out.setdefault(m.block_index, set()).add(m.mode)
    return out


def adapter_parameters(opt: AdaptiveOptimizer) -> int:
    return sum(p.numel() for m in opt.layers.values() for n, p in m.mode_parameters() if n.startswith("lora_"))


# ---------------------------------------------------------------- AutoMode
def test_automode_decides_u_times_per_epoch_and_scores_only_before_decisions():
    model = bert()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=AutoMode(u=3, t=25, score_steps=2), steps_per_epoch=12, rank=4)
    armed = []
    train(model, opt, 24, on_step=lambda o: armed.append(o.collector.armed))
    assert [e["step"] for e in opt.score_log] == [4, 8, 12, 16, 20, 24]
    # armed[i] is the state for step i + 2 (set after step i + 1): armed on steps 3-4, 7-8, 11-12, ...
    armed_steps = [i + 2 for i, a in enumerate(armed) if a]
    assert armed_steps == [3, 4, 7, 8, 11, 12, 15, 16, 19, 20, 23, 24]
    for entry in opt.score_log:
        assert set(entry["scores"]) == set(opt.layers)
        assert all(v["grad_norm"] > 0 for v in entry["scores"].values())


@pytest.mark.parametrize("granularity,t,bottom,expected", [
    ("block", 25, 25, {Mode.FULL: 1, Mode.LORA: 2, Mode.FROZEN: 1}),   # 4 blocks
    ("block", 10, 0, {Mode.FULL: 1, Mode.LORA: 3, Mode.FROZEN: 0}),    # README: t=10 → top 10 %, ⌈0.4⌉ = 1
    ("module", 25, 0, {Mode.FULL: 6, Mode.LORA: 18, Mode.FROZEN: 0}),  # 24 target modules
])
def test_automode_fractions(granularity, t, bottom, expected):
    model = bert()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=AutoMode(u=2, t=t, bottom=bottom, granularity=granularity),
                            steps_per_epoch=6, rank=4)
    assert all(m.mode is Mode.LORA for m in opt.layers.values())  # starts all-LoRA
    train(model, opt, 3)
    if granularity == "block":
        blocks = modes_by_block(opt)
        assert all(len(modes) == 1 for modes in blocks.values())  # a block shares one mode
        counts = {mode: sum(1 for modes in blocks.values() if mode in modes) for mode in Mode}
    else:
        counts = {mode: sum(1 for m in opt.layers.values() if m.mode is mode) for mode in Mode}
    assert counts == expected
    opt.check_consistency()


class ParallelBlocks(nn.Module):
    """Four independent two-layer blocks whose outputs are summed, block ``loud`` scaled by ``gain``."""

    def __init__(self, loud: int, gain: float = 30.0, width: int = 12) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
                                    for _ in range(4))
        self.gains = [gain if i == loud else 1.0 for i in range(4)]
        self.classifier = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(sum(g * block(x) for g, block in zip(self.gains, self.blocks)))


@pytest.mark.parametrize("loud", [0, 2, 3])
def test_automode_promotes_exactly_the_block_that_matters(loud):
    torch.manual_seed(loud)
    model = ParallelBlocks(loud)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=AutoMode(u=1, t=25, score_steps=4), steps_per_epoch=5,
                            targets=r"blocks\..*", rank=2)
    x, y = torch.randn(32, 12), torch.randn(32, 1)
    for _ in range(5):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    full = {m.block_index for m in opt.layers.values() if m.mode is Mode.FULL}
    assert full == {loud}
    assert all(m.mode is Mode.LORA for m in opt.layers.values() if m.block_index != loud)
    before = model.blocks[loud][0].weight.detach().clone()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.blocks[loud][0].weight, before)  # the promoted block trains


def test_automode_without_epoch_length_fails_clearly_before_updating():
    model = bert(layers=2)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="automode", rank=4)
    model(input_ids=token_batch(4, 9), labels=LABELS).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="counts in epochs: pass steps_per_epoch="):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- Spectrum / ALoRS
def plant_signal(model: nn.Module, blocks: set[int], strength: float = 4.0) -> None:
    """Add a strong rank-2 component to every target weight of ``blocks``."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layer." in name and int(name.split(".")[3]) in blocks:
                m, n = module.weight.shape
                u, v = torch.randn(m, 2, generator=gen), torch.randn(2, n, generator=gen)
                scale = float(module.weight.std()) * (math.sqrt(m) + math.sqrt(n)) * strength
                module.weight.add_(scale * (u @ v) / (u.norm() * v.norm()))


def test_spectrum_selects_the_planted_layers_per_type():
    model = bert()
    plant_signal(model, {1, 3})
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Spectrum(top_percent=50))
    blocks = modes_by_block(opt)
    assert blocks == {0: {Mode.FROZEN}, 1: {Mode.FULL}, 2: {Mode.FROZEN}, 3: {Mode.FULL}}
    assert all(p.requires_grad for p in model.bert.encoder.layer[1].parameters())  # the whole block trains
    assert not any(p.requires_grad for p in model.bert.encoder.layer[0].parameters())


def test_spectrum_compat_selects_what_spectrum_py_would():
    model = bert(seed=3)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Spectrum(top_percent=50, mode="compat"))
    by_type: dict[str, list[tuple[float, str]]] = {}
    for name, module in opt.layers.items():
        snr = _reference_spectrum_snr(module.effective_weight())  # spectrum.py's algorithm, one at a time
        by_type.setdefault(module.layer_type, []).append((snr, name))
    expected = {name for entries in by_type.values()
                for _, name in sorted(entries, key=lambda e: e[0], reverse=True)[:int(len(entries) * 50 / 100)]}
    assert {n for n, m in opt.layers.items() if m.mode is Mode.FULL} == expected


def test_spectrum_rescans_every_epoch():
    model = bert()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Spectrum(top_percent=25, rescan_epochs=1), steps_per_epoch=5)
    train(model, opt, 10)
    assert [e["step"] for e in opt.score_log] == [0, 5, 10]
    per_type = {}
    for m in opt.layers.values():
        per_type.setdefault(m.layer_type, []).append(m.mode)
    assert all(modes.count(Mode.FULL) == 1 for modes in per_type.values())


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_alors_bands(quantize):
    pytest.importorskip("bitsandbytes") if quantize else None
    model = bert()
    plant_signal(model, {2})
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=ALoRS(high=25, mid=50, r_high=8, r_low=2, quantize=quantize))
    assert all(isinstance(m, QuantLoRALinear) == (quantize is not None) for m in opt.layers.values())
    per_type: dict[str, list[tuple[Mode, int]]] = {}
    for m in opt.layers.values():
        per_type.setdefault(m.layer_type, []).append((m.mode, m.rank if m.mode is Mode.LORA else 0))
        if m.block_index == 2:
            assert (m.mode, m.rank) == (Mode.LORA, 8)  # planted signal → high band
    for bands in per_type.values():
        assert sorted(bands) == sorted([(Mode.LORA, 8), (Mode.LORA, 2), (Mode.LORA, 2), (Mode.FROZEN, 0)])
    losses = train(model, opt, 12, same_batch=True)
    assert losses[-1] < losses[0]
    assert all(bool(m.lora_B.abs().sum() > 0) for m in opt.layers.values() if m.mode is Mode.LORA)


# ---------------------------------------------------------------- RankAllocation
def _fixed_rank_count(rank: int) -> int:
    model = bert()
    return adapter_parameters(AdaptiveOptimizer(model, lr=1e-3, policy=LoRA(rank), rank=rank))


@pytest.mark.parametrize("budget", [8, 16])
@pytest.mark.parametrize("strategy", ["linear_decay", "attention_high", "weight_norm", "activation"])
def test_rank_allocation_matches_the_fixed_rank_budget(strategy, budget):
    model = bert()
    with torch.no_grad():  # make one layer's weights and inputs stand out
        model.bert.encoder.layer[2].intermediate.dense.weight.mul_(3.0)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=RankAllocation(strategy, budget=budget, calibration_steps=3))
    train(model, opt, 5)
    ours, baseline = adapter_parameters(opt), _fixed_rank_count(budget)
    assert abs(ours - baseline) <= 0.02 * baseline, (ours, baseline)
    ranks = {n: m.rank for n, m in opt.layers.items()}
    assert len(set(ranks.values())) > 1  # not uniform
    if strategy == "linear_decay":
        by_block = [[r for n, r in ranks.items() if opt.layers[n].block_index == b] for b in range(4)]
        assert min(by_block[0]) > max(by_block[3])
    elif strategy == "attention_high":
        for b in range(4):
            attn = [r for n, r in ranks.items() if opt.layers[n].block_index == b and ".attention." in n]
            mlp = [r for n, r in ranks.items() if opt.layers[n].block_index == b and ".attention." not in n]
            assert min(attn) > max(mlp)
    elif strategy == "weight_norm":
        assert max(ranks, key=ranks.get) == "bert.encoder.layer.2.intermediate.dense"
    else:
        assert [e["step"] for e in opt.score_log] == [3]  # ranks set once, after calibration
        act = {n: v["act_rms"] for n, v in opt.score_log[0]["scores"].items()}
        top = max(act, key=act.get)
        assert ranks[top] == max(ranks.values())
    opt.check_consistency()


@given(st.lists(st.tuples(st.floats(0.01, 100), st.integers(2, 64), st.integers(2, 64)), min_size=1, max_size=30),
       st.integers(1, 32), st.integers(1, 4))
def test_allocate_ranks_hits_the_budget_whenever_the_uniform_rank_fits(layers, rank, min_rank):
    names = [f"l{i}" for i in range(len(layers))]
    weights = {n: w for n, (w, _, _) in zip(names, layers)}
    costs = {n: i + o for n, (_, i, o) in zip(names, layers)}
    caps = {n: min(i, o) for n, (_, i, o) in zip(names, layers)}
    budget = rank * sum(costs.values())
    if not min_rank <= rank <= min(caps.values()):  # the uniform rank is out of bounds: may be infeasible
        try:
            allocate_ranks(weights, costs, budget, min_rank, caps)
        except ValueError as error:
            assert "cannot allocate ranks within 2%" in str(error) and "min_rank=" in str(error)
        return
    ranks = allocate_ranks(weights, costs, budget, min_rank, caps)
    assert abs(sum(ranks[n] * costs[n] for n in ranks) - budget) <= 0.02 * budget
    assert all(min_rank <= r <= caps[n] for n, r in ranks.items())
    heavy, light = max(weights, key=weights.get), min(weights, key=weights.get)
    if costs[heavy] == costs[light] and caps[heavy] == caps[light]:
        assert ranks[heavy] >= ranks[light] - 1  # more weight, (almost) never less rank


# ---------------------------------------------------------------- LayerwiseLR
def test_layerwise_lr_cycles_phases_and_bounds_scales():
    model = bert()
    policy = LayerwiseLR(floor=0.1)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=policy, steps_per_epoch=5)
    assert all(m.mode is Mode.FULL for m in opt.layers.values())
    seen = [dict(opt.lr_scales)]
    train(model, opt, 15, on_step=lambda o: seen.append(dict(o.lr_scales)) if o.step_count % 5 == 0 else None)
    assert [e["step"] for e in opt.score_log] == [0, 5, 10, 15]
    keys = [set(k for k in e["scores"][next(iter(opt.layers))] if k in ("svd", "ce", "cs")) for e in opt.score_log]
    assert keys[0] == {"svd"} and "ce" in keys[1] and "cs" in keys[2]
    for scales in seen:
        assert all(0.1 <= s <= 1.0 for s in scales.values())
        assert max(scales.values()) == 1.0 and min(scales.values()) == pytest.approx(0.1)
    # lower SVD metric → higher LR: the layer with normalised SVD 0 gets the full LR
    svd = {n: v["svd"] for n, v in opt.score_log[0]["scores"].items()}
    assert seen[0][min(svd, key=svd.get)] == 1.0
    assert seen[0][max(svd, key=svd.get)] == pytest.approx(0.1)


def test_layerwise_lr_on_top_of_automode():
    model = bert()
    policy = LayerwiseLR(phases=["cs"], gamma=0.5, base={"method": "automode", "u": 2, "t": 25})
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=policy, steps_per_epoch=6, rank=4)
    assert all(m.mode is Mode.LORA for m in opt.layers.values())
    train(model, opt, 6)
    assert sum(1 for modes in modes_by_block(opt).values() if modes == {Mode.FULL}) == 1
    assert all(0.5 <= s <= 1.0 for s in opt.lr_scales.values())
    assert max(opt.lr_scales.values()) == 1.0 and min(opt.lr_scales.values()) == 0.5
    cs = {n: v["cs"] for n, v in opt.score_log[-1]["scores"].items()}  # higher CS → higher LR: 1 − γ(1 − M)
    for name, metric in cs.items():
        assert opt.lr_scales[name] == pytest.approx(1 - 0.5 * (1 - metric))


def test_layerwise_lr_with_identical_layers_keeps_scale_one_and_says_why():
    model = bert(layers=2)
    with torch.no_grad():
        for layer in model.bert.encoder.layer[1:]:
            layer.load_state_dict(model.bert.encoder.layer[0].state_dict())
    model.bert.encoder.layer[0].attention.self.query.weight.data.mul_(1.0)
    with pytest.warns(RuntimeWarning, match="same CS value"):
        opt = AdaptiveOptimizer(model, lr=1e-3, policy=LayerwiseLR(phases=("cs",)), steps_per_epoch=5,
                                targets=["query", "key"])
    assert set(opt.lr_scales.values()) == {1.0}


# ---------------------------------------------------------------- baselines
def test_qlora_bitfit_topk():
    pytest.importorskip("bitsandbytes")
    model = bert(layers=3)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=QLoRA(4))
    assert all(isinstance(m, QuantLoRALinear) and m.mode is Mode.LORA and m.rank == 4 for m in opt.layers.values())

    model = bert(layers=3)
    AdaptiveOptimizer(model, lr=1e-3, policy=BitFit())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") or n.startswith("classifier.") for n in trainable)
    assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} <= trainable

    model = bert(layers=3)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=TopK(k=1))
    assert modes_by_block(opt) == {0: {Mode.FROZEN}, 1: {Mode.FROZEN}, 2: {Mode.FULL}}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.2.output.LayerNorm.weight" in trainable
    assert not any(".layer.1." in n for n in trainable)
    opt = AdaptiveOptimizer(bert(layers=3), lr=1e-3, policy=TopK(k=2, rest="lora"))
    assert modes_by_block(opt) == {0: {Mode.LORA}, 1: {Mode.FULL}, 2: {Mode.FULL}}


# ---------------------------------------------------------------- building, determinism
EXAMPLES = {
    "full": {}, "lora": {"rank": 4}, "qlora": {"rank": 4}, "frozen": {}, "bitfit": {}, "topk": {"k": 2, "rest": "lora"},
    "scheduled": {"plan": {0: {"bert.encoder.layer.0.attention.self.query": "full"}, "5": {}}},
    "fixed": {"assignment": {"query": "full"}, "default": "lora"},
    "automode": {"u": 6, "t": 10}, "spectrum": {"top_percent": 50, "mode": "compat"},
    "hybrid": {"t": 33, "calibration_steps": 5, "freeze_prefix": 17},
    "alors": {"high": 20, "mid": 40, "r_high": 16, "r_low": 4},
    "rank_allocation": {"strategy": "attention_high", "budget": 16},
    "layerwise_lr": {"phases": ["svd", "cs"], "alpha": 0.5, "base": {"method": "automode", "t": 20}},
    "lisa": {"gamma": 2, "period": 10, "weighted": True}, "badam": {"period": 20, "order": "random", "seed": 1},
}


def test_every_policy_builds_from_a_mapping_and_round_trips():
    assert set(EXAMPLES) == set(POLICIES)
    for method, options in EXAMPLES.items():
        policy = build_policy({"method": method, **options})
        assert type(policy).method == method
        again = build_policy(policy.config())
        assert again.config() == policy.config()
        with pytest.raises(ValueError, match=rf"unknown option\(s\) \['bogus'\] for policy '{method}'"):
            build_policy({"method": method, **options, "bogus": 1})


def test_policies_build_from_yaml():
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load("method: layerwise_lr\nphases: [svd, ce]\nbase:\n  method: automode\n  u: 6\n  t: 10\n")
    policy = build_policy(spec)
    assert isinstance(policy, LayerwiseLR) and isinstance(policy.base, AutoMode)
    assert policy.phases == ("svd", "ce") and (policy.base.u, policy.base.t) == (6, 10)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tt'\] for policy 'automode'"):
        build_policy(yaml.safe_load("method: layerwise_lr\nbase: {method: automode, tt: 3}"))
    with pytest.raises(ValueError, match="unknown policy method 'autmode'"):
        build_policy({"method": "autmode"})


@pytest.mark.parametrize("bad, message", [
    ({"method": "automode", "t": 150}, r"t is a percentage in \[0, 100\], got 150"),
    ({"method": "automode", "t": 60, "bottom": 50}, "t \\+ bottom must be ≤ 100 .*got 60 \\+ 50"),
    ({"method": "rank_allocation", "strategy": "random"}, "strategy must be one of .*linear_decay.*got 'random'"),
    ({"method": "layerwise_lr", "phases": ["svd", "snr"]}, "phases must be .*got \\('svd', 'snr'\\)"),
    ({"method": "layerwise_lr", "base": "layerwise_lr"}, "LayerwiseLR cannot be its own base"),
    ({"method": "spectrum", "mode": "iqr"}, "SNR mode must be one of .*got 'iqr'"),
    ({"method": "alors", "high": 70, "mid": 40}, "high \\+ mid must be ≤ 100 percent, got 70 \\+ 40")])
def test_bad_policy_options_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        build_policy(bad)


def _views(n_blocks: int = 4) -> dict[str, LayerView]:
    views = {}
    for b in range(n_blocks):
        for kind in ("attention.self.query", "output.dense"):
            name = f"encoder.layer.{b}.{kind}"
            views[name] = LayerView(name, f"encoder.layer.{b}", b, kind, Mode.LORA, 8, 1.0, 32, 32, False)
    return views


def _shuffled(d: dict, seed: int) -> dict:
    items = list(d.items())
    random.Random(seed).shuffle(items)
    return dict(items)


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=8, max_size=8), st.integers(0, 1000))
def test_decisions_are_deterministic_given_the_same_scores(values, seed):
    views = _views()
    scores = {n: {"grad_norm": v, "snr": v, "snr_compat": v, "weight_rms": v + 0.1, "act_rms": v + 0.1,
                  "svd": v / 10, "ce": v / 10, "cs": v / 10}
              for n, v in zip(views, values)}
    for policy in (AutoMode(t=25, bottom=25), AutoMode(t=30, granularity="module"), Spectrum(), ALoRS(quantize=None),
                   RankAllocation("weight_norm"), LayerwiseLR(phases=("cs",))):
        first = policy.decide(views, scores, 6, 6) if policy.method == "automode" else policy.initial(views, scores)
        again = (policy.decide(views, _shuffled(scores, seed), 6, 6) if policy.method == "automode"
                 else policy.initial(views, _shuffled(scores, seed)))
        assert first == again


@pytest.mark.parametrize("score_steps", [None, 2])
def test_automode_resume_mid_window_equals_uninterrupted(tmp_path, score_steps):
    """Stats gathered before the checkpoint count in the resumed run's decision, and hooks that
    stay armed across a decision keep feeding the next window."""
    def build():
        model = bert(layers=3)
        policy = AutoMode(u=2, t=34, score_steps=score_steps)
        return model, AdaptiveOptimizer(model, lr=1e-3, policy=policy, steps_per_epoch=6, rank=2)

    model, opt = build()
    train(model, opt, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    more = [token_batch(4, 9, seed=100 + i) for i in range(7)]

    def finish(model, opt):
        for tokens in more:
            model(input_ids=tokens, labels=LABELS).loss.backward()
            opt.step()
            opt.zero_grad()
    finish(model, opt)

    model2, opt2 = build()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    opt2.load_state_dict(saved["opt"])
    model2.load_state_dict(saved["model"])
    finish(model2, opt2)
    assert [e["step"] for e in opt2.score_log] == [3, 6, 9, 12]
    assert opt2.score_log == opt.score_log and opt2.history == opt.history
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        torch.testing.assert_close(p2, p, rtol=0, atol=1e-6, msg=name)


def test_hooks_armed_across_decisions_score_each_window_afresh():
    model = bert(layers=2)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=AutoMode(u=3, t=50, score_steps=None), steps_per_epoch=6, rank=2)
    seen = []
    train(model, opt, 6, on_step=lambda o: seen.append({n: s.batches for n, s in o.collector.stats.items()}))
    assert opt.collector.armed
    assert [set(b.values()) for b in seen] == [{1}, {0}, {1}, {0}, {1}, {0}]  # 2 steps per window, reset after
    grads = [[v["grad_norm"] for v in e["scores"].values()] for e in opt.score_log]
    assert grads[0] != grads[1] != grads[2]


def test_a_custom_policy_without_init_of_its_own_checkpoints_and_resumes():
    """Policy.config() read object.__init__'s (*args, **kwargs) as settings and failed; a policy
    class with no constructor of its own now saves and loads with the optimizer."""
    from adaptopt import AdaptiveOptimizer, LayerDecision, Mode, Policy
    from tests.tiny_models import tiny_bert

    class HalfFull(Policy):
        method = "half_full"

        def initial(self, layers, scores):
            return {n: LayerDecision(Mode.FULL if "layer.0." in n else Mode.LORA) for n in layers}

    opt = AdaptiveOptimizer(tiny_bert(), policy=HalfFull(), rank=2)
    state = opt.state_dict()
    assert state["policy"] == {"method": "half_full"}
    fresh = AdaptiveOptimizer(tiny_bert(), policy=HalfFull(), rank=2)
    fresh.load_state_dict(state)
    assert [m.mode for m in fresh.layers.values()] == [m.mode for m in opt.layers.values()]


@given(importance=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=12), t=st.sampled_from([10, 25, 50]),
       keep=st.floats(0.0, 2.0), seed=st.integers(0, 1000))
def test_automode_keep_holds_full_units_until_beaten_by_the_margin(importance, t, keep, seed):
    """With hysteresis ``keep``, the FULL set is the top by I·(1+keep) for incumbents, I otherwise
    (checked against a brute-force count); keep=0 is plain ranking; the rest rank by I."""
    policy = AutoMode(t=t, keep=keep)
    units = [f"u{i}" for i in range(len(importance))]
    scores = dict(zip(units, importance))
    full_now = frozenset(random.Random(seed).sample(units, k=len(units) // 3))
    modes = policy.assign(scores, full_now)
    full = {u for u, m in modes.items() if m is Mode.FULL}
    assert len(full) == math.ceil(len(units) * t / 100)
    held = {u: scores[u] * (1 + keep) if u in full_now else scores[u] for u in units}
    for winner in full:  # nobody outside outranks a winner by its held importance
        assert all(held[loser] <= held[winner] for loser in set(units) - full)
    if keep == 0:
        assert modes == policy.assign(scores)
    for incumbent in full_now:  # an incumbent loses its slot only to units above (1+keep)·its importance
        if incumbent not in full:
            beaten_by = [u for u in full if scores[u] * (1 + keep * (u in full_now)) >= scores[incumbent] * (1 + keep)]
            assert len(beaten_by) == len(full)


def test_automode_keep_is_validated_by_name():
    for bad in (-0.1, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="keep must be a finite number"):
            AutoMode(keep=bad)
