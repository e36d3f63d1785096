"""QuantLoRALinear over bitsandbytes NF4/FP4 on CPU: transitions, parity, merge, retention."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from adaptopt import LoRALinear, Mode, QuantLoRALinear  # noqa: E402
from adaptopt.layers.factors import factors_from_svd, svd_dense  # noqa: E402
from adaptopt.layers.quant import dequantize  # noqa: E402
from tests.helpers import abs_scale, make_base, randomize_adapter, simulate_training  # noqa: E402


def expected_output(module: QuantLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Reference forward computed another way: the dense weight by hand, then one matmul."""
    weight = dequantize(module.base).double()
    if module.delta is not None:
        weight = weight + module.delta.detach().double()
    if module.lora_A is not None:
        weight = weight + module.scaling * module.lora_B.detach().double() @ module.lora_A.detach().double()
    out = x.double() @ weight.T
    return out if module.bias is None else out + module.bias.detach().double()


def packed_state(module: QuantLoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    return module.base.weight.data.clone(), module.base.weight.quant_state.absmax.clone()


@st.composite
def quant_layers(draw):
    in_features, out_features = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rank = draw(st.integers(1, 8))
    alpha = draw(st.floats(0.5, 64.0))
    quant_type = draw(st.sampled_from(["nf4", "fp4"]))
    kind = draw(st.sampled_from(["linear", "conv1d"]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    module = QuantLoRALinear(make_base(kind, in_features, out_features, bias=draw(st.booleans())), rank, alpha,
                             rslora=draw(st.booleans()), quantize=quant_type)
    return module, torch.randn(3, in_features)


transitions = st.lists(st.tuples(st.sampled_from(list(Mode)), st.integers(1, 10)), min_size=1, max_size=8)


@given(quant_layers(), transitions)
def test_quant_transitions_preserve_function_except_documented_truncation(layer, steps):
    """Every transition keeps ``deq(Q) + ΔW`` except demotions from FULL and rank cuts, whose
    Frobenius error equals the norm of the discarded singular values (Eckart–Young),
    computed here independently in float64. ``Q`` is never re-quantized."""
    module, x = layer
    packed, absmax = packed_state(module)
    for mode, rank in steps:
        simulate_training(module)
        weight_before = module.dense_weight().double()
        output_before = module(x)
        singular_values = torch.linalg.svdvals(module.delta_weight().double())
        truncates = mode is not Mode.FULL and (
            module.mode is Mode.FULL or (module.lora_A is not None and rank < module.rank))
        expected_error = float(singular_values[rank:].norm()) if truncates else 0.0

        module.set_mode(mode, rank)

        assert (module.mode, module.rank) == (mode, rank)
        error = float((module.dense_weight().double() - weight_before).norm())
        scale = float(weight_before.norm()) + float(singular_values.norm())
        assert abs(error - expected_error) <= 1e-5 * scale + 1e-6, (mode, rank, error, expected_error)
        if expected_error == 0.0:
            bound = 1e-6 * abs_scale(x, module).amax(dim=-1, keepdim=True) + 1e-30
            assert ((module(x) - output_before).abs() <= bound).all()
        reference_gap = (module(x).double() - expected_output(module, x)).abs()
        assert (reference_gap <= 1e-6 * abs_scale(x, module).amax(dim=-1, keepdim=True) + 1e-30).all()
        _assert_representation(module)
        assert torch.equal(module.base.weight.data, packed)
        assert torch.equal(module.base.weight.quant_state.absmax, absmax)


def _assert_representation(module: QuantLoRALinear) -> None:
    trainable = {name for name, _ in module.trainable_parameters()}
    if module.mode is Mode.FULL:
        assert module.lora_A is None and module.delta is not None
        assert trainable == {"delta"} | ({"base.bias"} if module.bias is not None else set())
    elif module.mode is Mode.LORA:
        assert module.delta is None and module.lora_A.shape[0] == module.rank
        assert trainable == {"lora_A", "lora_B"}
    else:
        assert module.delta is None and trainable == set()


@given(quant_layers())
def test_quant_merge_matches_unmerged_and_is_reversible(layer):
    module, x = layer
    randomize_adapter(module)
    packed, _ = packed_state(module)
    unmerged = module(x)
    module.merge()
    module.merge()
    merged = module(x)
    bound = 1e-6 * abs_scale(x, module).amax(dim=-1, keepdim=True) + 1e-30  # the fp32 dot-product error bound
    assert ((merged - unmerged).abs() <= bound).all(), float(((merged - unmerged).abs() / bound).max())
    assert torch.equal(module.base.weight.data, packed)  # merging never re-quantizes
    module.unmerge()
    module.unmerge()
    assert not module.merged
    assert torch.equal(module(x), unmerged)


def test_qlora_forward_equals_lora_on_the_dequantized_weight():
    """torchtune's QLoRA parity check: same factors over deq(Q) in a plain LoRALinear."""
    torch.manual_seed(0)
    quantized = QuantLoRALinear(make_base("linear", 64, 32), rank=4, alpha=8, quantize="nf4")
    randomize_adapter(quantized)
    dense = torch.nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(dequantize(quantized.base))
        dense.bias.copy_(quantized.bias)
    plain = LoRALinear(dense, rank=4, alpha=8)
    with torch.no_grad():
        plain.lora_A.copy_(quantized.lora_A)
        plain.lora_B.copy_(quantized.lora_B)
    x = torch.randn(5, 64)
    torch.testing.assert_close(quantized(x), plain(x), rtol=1e-5, atol=1e-5)


def test_conv1d_base_is_quantized_in_linear_layout_and_exported_in_its_own():
    torch.manual_seed(0)
    conv = make_base("conv1d", 64, 48)
    module = QuantLoRALinear(conv, rank=4, alpha=8, quantize={"quant_type": "nf4", "blocksize": 64})
    assert module.fan_in_fan_out and module.dense_weight().shape == conv.weight.shape == (64, 48)
    relative_error = (module.dense_weight() - conv.weight).norm() / conv.weight.norm()
    assert relative_error < 0.15  # NF4 round-trip of a Gaussian matrix is ~10% relative
    x = torch.randn(2, 7, 64)
    assert module(x).shape == (2, 7, 48)
    # the layer computes exactly x·deq(Q) + b (the NF4 error itself is bounded above): compared with that
    # reference, computed another way in float64, within float32 rounding of a 64-term dot product
    # (64 · 2⁻²⁴ relative to Σ|x||w|, with a factor 4 of slack)
    dense = module.dense_weight().detach().double()
    reference = x.double() @ dense + conv.bias.detach().double()
    scale = x.double().abs() @ dense.abs() + conv.bias.detach().double().abs()
    assert bool(((module(x).detach().double() - reference).abs() <= 4 * 64 * 2 ** -24 * scale).all())


def test_wraps_an_existing_bitsandbytes_layer_and_a_bf16_compute_dtype():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(32, 16, bias=False, compute_dtype=torch.bfloat16, quant_type="fp4")
    layer.weight = bnb.nn.Params4bit(torch.randn(16, 32).bfloat16(), requires_grad=False, quant_type="fp4")
    layer = layer.to("cpu")
    module = QuantLoRALinear(layer, rank=4, alpha=16)
    assert module.base is layer and module.quant_type == "fp4" and module.lora_A.dtype == torch.bfloat16
    randomize_adapter(module)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    before = module(x)
    bound = 8 * torch.finfo(torch.bfloat16).eps * abs_scale(x, module)  # bf16 roundings, on each path
    module.set_mode(Mode.FULL)
    assert module.delta.dtype == torch.bfloat16
    assert bool(((module(x).float() - before.float()).abs() <= bound).all())


def test_plain_lora_refuses_a_quantized_base():
    layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4").to("cpu")
    with pytest.raises(TypeError, match="QuantLoRALinear"):
        LoRALinear(layer)


def requantized_change(module: QuantLoRALinear, delta: torch.Tensor) -> torch.Tensor:
    """What dequantize → add → re-quantize (the PEFT / ReLoRA 4-bit merge) actually adds to W."""
    state = module.base.weight.quant_state
    original = dequantize(module.base).float()
    packed, new_state = bnb.functional.quantize_4bit(original + delta, blocksize=state.blocksize,
                                                     quant_type=state.quant_type)
    return bnb.functional.dequantize_4bit(packed, new_state).float() - original


def retained(change: torch.Tensor, delta: torch.Tensor) -> float:
    """Share of ``delta`` that survives: its projection ``⟨change, Δ⟩ / ‖Δ‖²``."""
    return float((change * delta).sum() / delta.square().sum())


@pytest.mark.parametrize("relative_size", [0.01, 0.05, 0.10])
def test_promote_then_demote_keeps_a_low_rank_delta_requantizing_loses_it(relative_size, record_property):
    """docs/design.md §3: 4-bit layers never re-quantize a learned update. A rank-16 update of
    relative size 1/5/10% survives LORA → FULL → LORA; re-quantizing keeps far less of it."""
    torch.manual_seed(0)
    base = torch.nn.Linear(512, 512, bias=False)
    with torch.no_grad():
        base.weight.normal_(0, 0.02)
    module = QuantLoRALinear(base, rank=16, alpha=32, quantize="nf4")
    original = dequantize(module.base).float()
    direction = torch.randn(512, 16) @ torch.randn(16, 512)
    delta = direction * (relative_size * original.norm() / direction.norm())
    a, b, _ = factors_from_svd(svd_dense(delta), 16, module.scaling, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        module.lora_A.copy_(a)
        module.lora_B.copy_(b)

    module.set_mode(Mode.FULL)
    module.set_mode(Mode.LORA)
    ours = retained(module.dense_weight() - original, delta)
    ours_error = float((module.dense_weight() - original - delta).norm() / delta.norm())
    requantized = retained(requantized_change(module, delta), delta)
    record_property("retention", {"relative_size": relative_size, "ours": ours, "requantize": requantized})
    print(f"\n‖ΔW‖/‖W‖={relative_size:.0%}: promote+demote keeps {ours:.4f} (error {ours_error:.1e}), "
          f"dequantize→add→requantize keeps {requantized:.4f}")
    assert ours >= 0.9 and ours_error < 1e-4
    assert requantized < ours


def test_demotion_of_a_higher_rank_delta_keeps_the_best_rank_r_part():
    torch.manual_seed(1)
    module = QuantLoRALinear(make_base("linear", 40, 30), rank=4, alpha=4)
    module.set_mode(Mode.FULL)
    with torch.no_grad():
        module.delta.copy_(torch.randn(30, 40) * 0.1)
    delta = module.delta.detach().clone()
    module.set_mode(Mode.LORA, rank=4)
    u, s, vh = torch.linalg.svd(delta.double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(module.delta_weight().double(), best, rtol=1e-5, atol=1e-5)
    assert math.isclose(float((module.delta_weight().double() - delta.double()).norm()), float(s[4:].norm()),
                        rel_tol=1e-4)


def test_eval_passes_do_not_repack_or_change_the_4bit_layer():
    """bitsandbytes repacks a 4-bit weight in place for its bf16 CPU kernel on the first eval
    pass without grad; adapted layers must keep computing exactly what they did."""
    torch.manual_seed(0)
    module = QuantLoRALinear(nn.Linear(64, 64), rank=4)
    x = torch.randn(3, 64)
    weight, train_out = dequantize(module.base).clone(), module(x).detach()
    module.eval()
    with torch.no_grad():
        eval_out = module(x)
    assert torch.equal(eval_out, train_out)
    assert torch.equal(dequantize(module.base), weight)


@pytest.mark.parametrize("double_quant", [False, True])
def test_wrapping_an_already_repacked_base_restores_a_consistent_layout(double_quant):
    import bitsandbytes as bnb

    from adaptopt.layers.quant import QuantConfig, quantize_linear
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    torch.manual_seed(0)
    quantized = quantize_linear(nn.Linear(64, 64), QuantConfig(double_quant=double_quant))
    original = bnb.functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state).clone()
    quantized.eval()
    with torch.no_grad():
        quantized(torch.randn(2, 64))
    assert quantized.weight.quant_state.packing_format_for_cpu
    module = QuantLoRALinear(quantized, rank=4)
    weight = dequantize(module.base)
    assert (weight - original).abs().max() <= 2 ** -7 * original.abs().max()  # block scales rounded to bf16
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), x @ weight.T + quantized.bias, atol=1e-6)


@pytest.mark.parametrize("saved_mode, saved_rank", [(Mode.FULL, 4), (Mode.LORA, 2), (Mode.FROZEN, 2)])
def test_load_state_dict_adopts_the_saved_structure(saved_mode, saved_rank):
    """A state dict saved after transitions loads into a layer still in another mode/rank."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    saved = QuantLoRALinear(dense, rank=saved_rank)
    randomize_adapter(saved)
    saved.set_mode(saved_mode)
    simulate_training(saved)
    fresh = QuantLoRALinear(dense, rank=4, mode=Mode.LORA)
    result = fresh.load_state_dict(saved.state_dict(), strict=False)  # bitsandbytes' quant-state keys: unused
    assert not result.missing_keys and all(".weight." in k for k in result.unexpected_keys)
    assert (fresh.lora_A is None, fresh.delta is None) == (saved.lora_A is None, saved.delta is None)
    assert fresh.mode is (Mode.LORA if saved_mode is Mode.FROZEN else saved_mode)  # structure, not the mode
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), saved(x))
