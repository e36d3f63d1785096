"""The fused LoRA autograd node (adaptopt.layers.fused_lora) against a float64 reference computed by hand.

Tolerances follow the dot-product error bound: an element computed from ``k`` products is off
by at most ``~k·eps·Σ|terms|``; ``Σ|terms|`` is the same formula evaluated on absolute values
(for gradients: autograd of the formula on ``|x|, |W|, |A|, |B|`` with the gradient ``|g|``).
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaptopt import LoRALinear
from tests.helpers import make_base, randomize_adapter


def formula(x, weight, bias, a, b, s, fan_in_fan_out):
    """``x Wᵀ + b + s·(x Aᵀ)Bᵀ`` written out, in whatever dtype the inputs have."""
    w = weight.T if fan_in_fan_out else weight
    out = x @ w.T + s * (x @ a.T) @ b.T
    return out if bias is None else out + bias


def reference(module, x, grad, weight=None):
    """Output and gradients (x, A, B) in float64, and their error scales (the same on |·|).
    ``weight``: the dense weight the layer computes with (default its base weight)."""
    weight = module.weight if weight is None else weight
    results = []
    for transform in (lambda t: t.double(), lambda t: t.double().abs()):
        xr = transform(x.detach()).requires_grad_(True)
        a = transform(module.lora_A.detach()).requires_grad_(True)
        b = transform(module.lora_B.detach()).requires_grad_(True)
        bias = None if module.bias is None else transform(module.bias.detach())
        out = formula(xr, transform(weight.detach()), bias, a, b, module.scaling, module.fan_in_fan_out)
        out.backward(transform(grad))
        results.append((out.detach(), xr.grad, a.grad, b.grad))
    return results


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["linear", "conv1d"]))
    in_features, out_features, rank = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 8))
    alpha = draw(st.floats(0.5, 64.0))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    leading = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    module = LoRALinear(make_base(kind, in_features, out_features, bias=draw(st.booleans()), dtype=dtype),
                        rank, alpha, rslora=draw(st.booleans()))
    randomize_adapter(module)
    x = torch.randn(*leading, in_features, dtype=dtype)
    return module, x


@settings(max_examples=80, deadline=None)
@given(cases())
def test_fused_output_and_gradients_match_the_formula(case):
    module, x = case
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    assert type(out.grad_fn).__name__ == "FusedLoRALinearBackward"
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_matches_reference(module, x, xg, out, grad)
    assert module.weight.grad is None and (module.bias is None or module.bias.grad is None)


def assert_matches_reference(module, x, xg, out, grad, weight=None):
    """Output and gradients within the dot-product error bound of the float64 formula."""
    (ref, ref_x, ref_a, ref_b), (scale, scale_x, scale_a, scale_b) = reference(module, x, grad, weight)
    eps = torch.finfo(x.dtype).eps
    k = module.in_features + module.out_features + module.rank + 4
    for got, want, size in ((out, ref, scale), (xg.grad, ref_x, scale_x), (module.lora_A.grad, ref_a, scale_a),
                            (module.lora_B.grad, ref_b, scale_b)):
        assert got.dtype == x.dtype and got.shape == want.shape
        error = (got.double() - want).abs()
        assert bool((error <= k * eps * size + 1e-300).all()), float((error / (size + 1e-300)).max() / eps)


def test_fused_equals_the_composite_path_and_falls_back_where_it_must():
    torch.manual_seed(0)
    module = LoRALinear(nn.Linear(16, 12), rank=4, alpha=6)
    randomize_adapter(module)
    x = torch.randn(5, 16, requires_grad=True)

    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = module(x)
        out.square().sum().backward()
        return out.grad_fn, out.detach(), x.grad.clone(), module.lora_A.grad.clone(), module.lora_B.grad.clone()

    fused = run()
    assert type(fused[0]).__name__ == "FusedLoRALinearBackward"
    handle = module.base.register_forward_hook(lambda *args: None)  # a hook on the base must still run
    composite = run()
    handle.remove()
    assert type(composite[0]).__name__ != "FusedLoRALinearBackward"
    for got, want in zip(fused[1:], composite[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x).dtype == torch.bfloat16  # autocast goes through the composite path
    module.base.weight.requires_grad_(True)  # a user unfreezing the base by hand: it must get its gradient
    module(x).sum().backward()
    assert module.base.weight.grad is not None
