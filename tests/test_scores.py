"""Layer scores on constructed weights with known answers, and parity with references
computed another way (one matrix at a time, plain loops, numpy histograms)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from adaptopt import LoRALinear, Mode
from adaptopt.scores import (
    SNR_MODES,
    UniformScoresError,
    cosine_metric,
    cross_entropy_metric,
    mp_median,
    normalise,
    singular_values,
    spectrum_snr,
    svd_metric,
    unit_importance,
    weight_norms,
    weight_scores,
)
from adaptopt.training.layer_stats import StatsCollector
from tests.helpers import make_base, randomize_adapter


def _gaussian(m: int, n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * scale


def _reference_spectrum_snr(weight: torch.Tensor) -> float:
    """``spectrum.py``'s algorithm, one matrix at a time, as its source reads."""
    s = torch.linalg.svdvals(weight.detach().float())
    max_singular_value = s[0]
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = weight.shape
    beta = n / m if n < m else m / n
    threshold = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    signal = s[s > threshold].sum()
    noise = s[s <= threshold].sum()
    snr = signal / noise if noise != 0 else signal / 1.0
    return float(snr / max_singular_value)


# ---------------------------------------------------------------- Spectrum SNR
@given(st.sampled_from([(24, 24), (16, 48), (64, 16), (32, 40)]), st.integers(0, 5),
       st.floats(0.01, 10.0), st.integers(0, 4))
def test_compat_snr_reproduces_spectrum_py(shape, low_rank, scale, seed):
    weight = _gaussian(*shape, seed, scale)
    if low_rank:
        weight = weight + 5 * scale * _gaussian(shape[0], low_rank, seed + 1) @ _gaussian(low_rank, shape[1], seed + 2)
    ours = spectrum_snr({"w": weight}, mode="compat")["w"]["snr"]
    assert ours == pytest.approx(_reference_spectrum_snr(weight), rel=1e-4)


def test_compat_counts_pure_noise_as_signal_on_non_square_matrices():
    """The documented flaw: every singular value of non-square Gaussian noise is "signal"."""
    scores = spectrum_snr({"w": _gaussian(128, 512, 0)}, mode="compat")["w"]
    assert scores["signal_fraction"] == 1.0


@pytest.mark.parametrize("shape", [(256, 256), (128, 512), (512, 96)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_mp_scores_pure_noise_as_almost_no_signal(shape, scale):
    for seed in range(3):
        values = spectrum_snr({"w": _gaussian(*shape, seed, scale)}, mode="mp")["w"]
        assert values["signal_fraction"] < 0.02, values
        assert values["snr"] < 0.02


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("shape", [(128, 128), (96, 300)])
def test_mp_finds_exactly_the_planted_directions(k, shape):
    m, n = shape
    noise = _gaussian(m, n, 7)
    edge = math.sqrt(m) + math.sqrt(n)
    u, _ = torch.linalg.qr(_gaussian(m, k, 8))
    v, _ = torch.linalg.qr(_gaussian(n, k, 9))
    strengths = torch.linspace(3, 6, k) * edge
    weight = noise + u @ torch.diag(strengths) @ v.T
    values = spectrum_snr({"w": weight}, mode="mp")["w"]
    s = torch.linalg.svdvals(weight)
    assert int((s > values["threshold"]).sum()) == k
    assert spectrum_snr({"w": 10 * weight}, mode="mp")["w"]["snr"] == pytest.approx(values["snr"], rel=1e-5)


def test_mp_median_matches_a_large_sample():
    for m, n in ((1200, 1200), (600, 1800)):
        s = torch.linalg.svdvals(_gaussian(m, n, 3).double())
        assert float((s ** 2 / n).quantile(0.5)) == pytest.approx(mp_median(m / n), abs=4e-3)


@pytest.mark.parametrize("workers", [1, 2])
def test_gram_singular_values_match_svdvals_in_float64(workers):
    low_rank = _gaussian(40, 3, 7) @ _gaussian(3, 24, 8) + 1e-3 * _gaussian(40, 24, 9)  # spans 4 decades
    weights = {f"w{i}": _gaussian(*shape, i) for i, shape in enumerate([(8, 12), (8, 12), (12, 8), (1, 9), (5, 5)])}
    weights["low_rank"] = low_rank
    weights["tied"] = weights["w0"]  # the same tensor under two names: computed once, reported twice
    fast = singular_values(weights, workers=workers)
    assert list(fast) == list(weights) and fast["tied"] is fast["w0"]
    for name, w in weights.items():
        exact = torch.linalg.svdvals(w.double())
        assert fast[name].dtype == torch.float32 and fast[name].shape == exact.shape
        # fp32 output rounding, plus the Gram route's eps64·σ_max²/σ_i (negligible here)
        torch.testing.assert_close(fast[name].double(), exact, rtol=2e-7, atol=1e-12 * float(exact[0]))
        torch.testing.assert_close(singular_values({name: w}, method="svd")[name], torch.linalg.svdvals(w))
    with pytest.raises(ValueError, match="method"):
        singular_values(weights, method="qr")


def test_gram_and_svd_rank_layers_identically_in_both_snr_modes():
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(24):  # three layer shapes, signal ranks and noise levels that vary layer to layer
        m, n = ((96, 96), (192, 96), (96, 192))[i % 3]
        k = int(torch.randint(1, 24, (1,), generator=generator))
        signal = torch.randn(m, k, generator=generator) @ torch.randn(k, n, generator=generator) / k ** 0.5
        weights[f"layers.{i // 3}.t{i % 3}"] = signal + float(torch.rand(1, generator=generator)) * 3 * torch.randn(
            m, n, generator=generator)
    for mode in SNR_MODES:
        ranked = {}
        for method in ("gram", "svd"):
            snr = spectrum_snr(weights, mode, singular_values(weights, method=method))
            ranked[method] = [sorted((name for name in weights if name.endswith(t)), key=lambda n: -snr[n]["snr"])
                              for t in ("t0", "t1", "t2")]
        assert ranked["gram"] == ranked["svd"]


# ---------------------------------------------------------------- SVD / CE / CS
def test_svd_metric_is_the_normalised_spectral_mass():
    flat, _ = torch.linalg.qr(_gaussian(16, 16, 0))           # all singular values 1 → mass 1
    rank_one = _gaussian(16, 1, 1) @ _gaussian(1, 16, 2)      # one non-zero value → mass 1/16
    decaying = torch.diag(torch.tensor([2.0 ** -i for i in range(16)]))
    raw = svd_metric({"flat": flat, "rank_one": rank_one, "decaying": decaying})
    assert raw["flat"] == pytest.approx(1.0, rel=1e-5)
    assert raw["rank_one"] == pytest.approx(1 / 16, rel=1e-3)
    assert raw["decaying"] == pytest.approx(sum(2.0 ** -i for i in range(16)) / 16, rel=1e-5)
    norm = normalise(raw, "SVD")
    assert norm["flat"] == 1.0 and norm["rank_one"] == 0.0 and 0 < norm["decaying"] < 1


def _reference_ce(weights: dict[str, torch.Tensor], bins: int) -> dict[str, float]:
    top = max(float(w.abs().max()) for w in weights.values())
    dists = {n: np.histogram(w.abs().numpy().ravel(), bins=bins, range=(0, top))[0] / w.numel()
             for n, w in weights.items()}
    out = {}
    for name, p in dists.items():
        others = [-(p * np.log(q + 1e-10)).sum() for other, q in dists.items() if other != name]
        out[name] = float(np.mean(others))
    return out


def test_cross_entropy_compares_layers_of_different_shapes():
    weights = {"a": _gaussian(8, 64, 0), "b": _gaussian(32, 24, 1), "c": _gaussian(40, 40, 2),
               "wide": _gaussian(24, 24, 3, scale=6.0)}
    raw = cross_entropy_metric(weights, bins=32)
    reference = _reference_ce(weights, bins=32)
    for name in weights:
        assert raw[name] == pytest.approx(reference[name], rel=1e-3)
    norm = normalise(raw, "CE")
    assert max(norm, key=norm.get) == "wide" and norm["wide"] == 1.0
    same = [raw[n] for n in ("a", "b", "c")]  # one distribution, three shapes: nearly equal CE
    assert max(same) - min(same) < 0.1 * (raw["wide"] - min(same))


def test_cosine_within_shape_groups():
    a, b = _gaussian(6, 10, 0), _gaussian(6, 10, 1)
    raw = cosine_metric({"a": a, "a_copy": a.clone(), "b": b, "alone": _gaussian(3, 3, 2)})
    cos_ab = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert raw["a"] == pytest.approx((1 + cos_ab) / 2, abs=1e-6)
    assert raw["a_copy"] == pytest.approx((1 + cos_ab) / 2, abs=1e-6)
    assert raw["b"] == pytest.approx(cos_ab, abs=1e-6)
    assert raw["alone"] == 0.0


def test_identical_layers_have_cs_one_and_cannot_be_normalised():
    w = _gaussian(8, 8, 0)
    raw = cosine_metric({f"l{i}": w.clone() for i in range(4)})
    assert all(v == pytest.approx(1.0) for v in raw.values())
    with pytest.raises(UniformScoresError, match=r"all 4 layers have the same CS value \(1\)"):
        normalise(raw, "CS")
    with pytest.warns(RuntimeWarning, match="same CS value"):
        scores = weight_scores({f"l{i}": w.clone() for i in range(4)}, ["cs"])
    assert all("cs" not in v and v["cs_raw"] == pytest.approx(1.0) for v in scores.values())


def test_normalise_maps_to_unit_interval():
    assert normalise({"a": 3.0, "b": -1.0, "c": 1.0}, "X") == {"a": 1.0, "b": 0.0, "c": 0.5}
    with pytest.raises(UniformScoresError, match="single target layer"):
        normalise({"only": 2.0}, "X")


# ---------------------------------------------------------------- norms, effective weights
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("merged", [False, True])
def test_effective_weight_is_what_the_layer_computes_with(kind, mode, merged):
    torch.manual_seed(0)
    module = LoRALinear(make_base(kind, 12, 7), rank=3, alpha=5.0)
    randomize_adapter(module)
    module.set_mode(mode)
    if mode is Mode.FULL:
        with torch.no_grad():
            module.weight.add_(0.1)
    if merged:
        module.merge()
    x = torch.randn(4, 12)
    expected = module(x).detach()
    got = x @ module.effective_weight().T + module.bias.detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_weight_norms_and_unknown_family():
    w = _gaussian(5, 7, 0)
    values = weight_norms({"w": w})["w"]
    assert values["weight_norm"] == pytest.approx(float(torch.linalg.norm(w)), rel=1e-6)
    assert values["weight_rms"] == pytest.approx(float(w.pow(2).mean().sqrt()), rel=1e-6)
    with pytest.raises(ValueError, match=r"unknown weight score family \['nope'\]"):
        weight_scores({"w": w}, ["nope"])


def test_activation_magnitudes_from_hooks_match_the_inputs():
    layer = nn.Linear(6, 3)
    collector = StatsCollector({"layer": layer})
    collector.arm()
    batches = [torch.randn(4, 5, 6) * (i + 1) for i in range(3)]
    for x in batches:
        layer(x).sum().backward()
    collector.disarm()
    scores = collector.scores()["layer"]
    everything = torch.cat([x.reshape(-1, 6) for x in batches])
    assert scores["act_rms"] == pytest.approx(float(everything.pow(2).mean().sqrt()), rel=1e-5)
    assert scores["act_mean_abs"] == pytest.approx(float(everything.abs().mean()), rel=1e-5)


def test_unit_importance_is_the_joint_gradient_norm():
    groups = {"block.0": ["q", "v"], "head": ["head"]}
    scores = {"q": {"grad_norm": 3.0}, "v": {"grad_norm": 4.0}, "head": {"grad_norm": 1.0}}
    assert unit_importance(groups, scores) == {"block.0": 5.0, "head": 1.0}
    with pytest.raises(ValueError, match=r"no 'grad_norm' score for \['head'\]"):
        unit_importance(groups, {"q": {"grad_norm": 1.0}, "v": {"grad_norm": 1.0}})


def test_weight_scores_on_modules_warn_nothing_for_distinct_layers():
    torch.manual_seed(0)
    layers = {f"l{i}": LoRALinear(make_base("linear", 16, 16), rank=2) for i in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = weight_scores(layers, ["snr", "snr_compat", "svd", "ce", "cs", "weight_norm"])
    for values in scores.values():
        assert {"snr", "snr_compat", "svd", "ce", "cs", "weight_norm"} <= set(values)
        assert all(0 <= values[k] <= 1 for k in ("svd", "ce", "cs"))
