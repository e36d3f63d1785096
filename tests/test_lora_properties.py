"""Property tests (hypothesis) of LoRALinear: merge correctness and function-preserving transitions.

Tolerances are derived, not tuned: a rounding error in an output element is bounded by
``k · eps · scale`` where ``scale = |x|·|W|ᵀ + s·(|x|·|A|ᵀ)·|B|ᵀ + |b|`` (tests.helpers.abs_scale).
Each property also checks that the quantity it compares is not trivially zero, so a
no-op implementation fails.
"""
from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from adaptopt import LoRALinear, Mode
from tests.helpers import abs_scale, make_base, randomize_adapter, simulate_training

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@st.composite
def lora_layers(draw, dtypes=DTYPES):
    """A LoRALinear over a random Linear / Conv1D with scaling ≠ 1 and a non-zero adapter."""
    kind = draw(st.sampled_from(["linear", "conv1d"]))
    in_features, out_features = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rank = draw(st.integers(1, 8))
    alpha = draw(st.floats(0.5, 64.0, allow_nan=False, allow_infinity=False))
    rslora, bias = draw(st.booleans()), draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    module = LoRALinear(make_base(kind, in_features, out_features, bias=bias, dtype=dtype), rank, alpha,
                        rslora=rslora)
    assume(abs(module.scaling - 1.0) > 1e-3)
    randomize_adapter(module, std=0.5)
    with torch.no_grad():
        module.lora_B.div_(module.scaling)  # unit-size update whatever s is; s still matters to the result
    x = torch.randn(3, in_features, dtype=dtype)
    return module, x


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@given(lora_layers())
def test_merged_output_equals_unmerged_and_unmerge_restores(layer):
    module, x = layer
    dtype = x.dtype
    w0 = module.weight.detach().clone()
    b, a = module.lora_B.detach().double(), module.lora_A.detach().double()
    reference_delta = module.scaling * (b @ a)
    delta_magnitude = module.scaling * (b.abs() @ a.abs())  # what the delta's own rounding scales with
    if module.fan_in_fan_out:
        reference_delta, delta_magnitude = reference_delta.T, delta_magnitude.T
    base_only = module.base(x).double()
    unmerged = module(x).double()
    tolerance = 4 * eps(dtype) * abs_scale(x, module) + 1e-30
    linear_delta = reference_delta.T if module.fan_in_fan_out else reference_delta
    expected_change = x.double() @ linear_delta.T
    assume(((expected_change.abs() > 2 * tolerance).any()))  # skip the rare near-zero random update

    module.merge()
    merged = module(x).double()
    assert module.merged
    assert ((merged - unmerged).abs() <= tolerance).all()
    # the adapter really changes the layer (so the comparison above is not vacuous), by x·ΔWᵀ
    assert ((merged - base_only - expected_change).abs() <= 2 * tolerance).all()
    # the merged weight is W + s·BA computed another way (float64, by hand)
    # one rounding of W + Δ, plus the rank-r dot products inside s·BA (error ≤ r·u·s|B||A|)
    weight_tolerance = eps(dtype) * (2 * w0.double().abs() + (module.rank + 2) * delta_magnitude) + 1e-30
    assert ((module.weight.double() - (w0.double() + reference_delta)).abs() <= weight_tolerance).all()

    merged_weight = module.weight.detach().clone()
    module.merge()  # idempotent: a second merge changes nothing
    assert torch.equal(module.weight, merged_weight)
    assert torch.equal(module(x).double(), merged)

    module.unmerge()
    assert not module.merged
    assert ((module.weight.double() - w0.double()).abs() <= weight_tolerance).all()
    module.unmerge()  # idempotent
    assert ((module.weight.double() - w0.double()).abs() <= weight_tolerance).all()
    assert ((module(x).double() - unmerged).abs() <= tolerance).all()


actions = st.lists(
    st.one_of(st.tuples(st.sampled_from(list(Mode)), st.integers(1, 10)), st.sampled_from(["merge", "unmerge"])),
    min_size=1, max_size=8)


@given(lora_layers(dtypes=[torch.float32, torch.float64]), actions)
def test_any_transition_sequence_preserves_the_function(layer, steps):
    """fp32: at most 1e-6 of the output scale (docs/design.md §3); fp64: the same number of ulps (a
    float64 weight that took a float32 detour on a merge would miss it by nine digits)."""
    module, x = layer
    ulps = 1e-6 / eps(torch.float32)
    weight_identity = module.base.weight
    for step in steps:
        simulate_training(module)
        before = module(x)
        scale = abs_scale(x, module).amax(dim=-1, keepdim=True)
        if step == "merge":
            module.merge()
        elif step == "unmerge":
            module.unmerge()
        else:
            mode, rank = step
            merged = module.merged
            module.set_mode(mode, rank)
            assert (module.mode, module.rank, module.merged) == (mode, rank, merged)
        after = module(x)
        assert ((after - before).abs() <= ulps * eps(x.dtype) * scale + 1e-300).all(), step
        assert module.base.weight is weight_identity
        _assert_trainable_set_matches_mode(module)


def _assert_trainable_set_matches_mode(module: LoRALinear) -> None:
    trainable = {name for name, _ in module.trainable_parameters()}
    expected = {Mode.FROZEN: set(), Mode.LORA: {"lora_A", "lora_B"},
                Mode.FULL: {"base.weight"} | ({"base.bias"} if module.bias is not None else set())}[module.mode]
    assert trainable == expected
    if module.mode is Mode.LORA:
        assert module.lora_A.shape == (module.rank, module.in_features)
        assert module.lora_B.shape == (module.out_features, module.rank)
    else:
        assert module.lora_A is None and module.lora_B is None


@given(lora_layers(dtypes=[torch.bfloat16]), st.sampled_from(list(Mode)), st.integers(1, 10))
def test_bf16_transition_error_is_one_rounding_of_the_weight(layer, mode, rank):
    """bf16: the only change is one rounding of W (≤ eps/2·|W+ΔW| per element) plus the two
    forward passes' own rounding, each ≤ eps·scale: the output moves by at most ~2 ulps of its scale."""
    module, x = layer
    before = module(x).float()
    scale = abs_scale(x, module)
    module.set_mode(mode, rank)
    after = module(x).float()
    assert ((after - before).abs() <= 2 * eps(torch.bfloat16) * scale + 1e-30).all()


@given(lora_layers(dtypes=[torch.float32]))
def test_gradients_reach_exactly_the_trainable_parameters(layer):
    module, x = layer
    for mode in (Mode.LORA, Mode.FULL, Mode.FROZEN):
        module.set_mode(mode)
        module.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        module(xg).square().sum().backward()
        with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
        assert with_grad == {name for name, _ in module.trainable_parameters()}
        assert xg.grad is not None  # the input gradient flows in every mode


def test_lora_forward_matches_hand_computed_formula():
    torch.manual_seed(0)
    base = make_base("linear", 6, 5)
    module = LoRALinear(base, rank=3, alpha=7.0, rslora=True)
    randomize_adapter(module)
    x = torch.randn(4, 6)
    s = 7.0 / 3 ** 0.5
    expected = x @ base.weight.T + base.bias + s * (x @ module.lora_A.T) @ module.lora_B.T
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)
    assert module.scaling == s


def test_fresh_adapter_is_kaiming_a_and_zero_b():
    module = LoRALinear(make_base("linear", 300, 20), rank=8, alpha=16)
    bound = 1 / 300 ** 0.5  # kaiming_uniform(a=√5): U(-1/√in, 1/√in)
    assert module.lora_A.abs().max() <= bound and module.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(module.lora_B) == 0


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    module = LoRALinear(make_base("linear", 16, 8), rank=4, alpha=8, dropout=0.5)
    randomize_adapter(module)
    x = torch.randn(10, 16)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))
    assert isinstance(LoRALinear(make_base("linear", 4, 4), dropout=0.0).dropout, torch.nn.Identity)
