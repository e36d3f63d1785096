"""The fused LoRA node over a 4-bit base (adaptopt.layers.fused_quant_lora) against the float64 formula on deq(Q),
against the composite path, and what it keeps for backward (never a dense weight)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.helpers import randomize_adapter
from tests.test_fused import assert_matches_reference

pytest.importorskip("bitsandbytes")
from adaptopt import QuantLoRALinear  # noqa: E402
from adaptopt.layers.quant import dequantize  # noqa: E402


@st.composite
def cases(draw):
    in_features, out_features, rank = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = nn.Linear(in_features, out_features, bias=draw(st.booleans())).to(dtype)
    module = QuantLoRALinear(base, rank, draw(st.floats(0.5, 64.0)), rslora=draw(st.booleans()),
                             quantize={"quant_type": draw(st.sampled_from(["nf4", "fp4"]))})
    randomize_adapter(module)
    x = torch.randn(*draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)), in_features, dtype=dtype)
    return module, x


@settings(max_examples=60, deadline=None)
@given(cases())
def test_fused_4bit_output_and_gradients_match_the_formula_on_the_dequantized_weight(case):
    module, x = case
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    assert type(out.grad_fn).__name__ == "FusedQuantLoRALinearBackward"
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_matches_reference(module, x, xg, out, grad, weight=dequantize(module.base))


def test_fused_4bit_equals_the_composite_path_and_falls_back_where_it_must():
    torch.manual_seed(0)
    module = QuantLoRALinear(nn.Linear(64, 48), rank=4, alpha=6)
    randomize_adapter(module)
    x = torch.randn(5, 64, requires_grad=True)

    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = module(x)
        out.square().sum().backward()
        return out.grad_fn, out.detach(), x.grad.clone(), module.lora_A.grad.clone(), module.lora_B.grad.clone()

    fused = run()
    assert type(fused[0]).__name__ == "FusedQuantLoRALinearBackward"
    handle = module.base.register_forward_hook(lambda *args: None)  # a hook on the base must still run
    composite = run()
    handle.remove()
    assert type(composite[0]).__name__ != "FusedQuantLoRALinearBackward"
    for got, want in zip(fused[1:], composite[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # bitsandbytes sums in its own order
    module.set_mode("full")  # a dense delta trains: the composite path
    assert type(module(x).grad_fn).__name__ != "FusedQuantLoRALinearBackward"


def test_the_fused_4bit_node_keeps_no_dense_weight_for_backward():
    torch.manual_seed(0)
    module = QuantLoRALinear(nn.Linear(256, 512), rank=4)
    x = torch.randn(3, 256, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = module(x)
    assert type(out.grad_fn).__name__ == "FusedQuantLoRALinearBackward"
    assert max(t.numel() for t in saved) < 256 * 512 // 8  # x, h, A, B: nothing of the weight's size
    out.sum().backward()
    assert x.grad is not None and module.lora_B.grad is not None
