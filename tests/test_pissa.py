"""PiSSA initialisation: the weight's principal rank-r part moves into A and B, the residual stays in W,
so the function is unchanged; the factors split the singular values evenly."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptopt import AdaptiveOptimizer, LoRALinear, Mode, find_adapters, inject_adapters
from tests.helpers import abs_scale, make_base, simulate_training
from tests.tiny_models import tiny_llama, token_batch


def dense(module) -> torch.Tensor:
    w = module.base.weight.detach()
    return (w.T if module.fan_in_fan_out else w).double()


@given(kind=st.sampled_from(["linear", "conv1d"]), shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
       rank=st.integers(1, 8), alpha=st.sampled_from([1.0, 3.0, 16.0]), rslora=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_pissa_keeps_the_function_and_holds_the_principal_part(kind, shape, rank, alpha, rslora, dtype, seed):
    torch.manual_seed(seed)
    in_features, out_features = shape
    base = make_base(kind, in_features, out_features, dtype=dtype)
    original = copy.deepcopy(base)
    weight = dense(LoRALinear(copy.deepcopy(base), rank=rank, mode=Mode.FROZEN))
    module = LoRALinear(base, rank=rank, alpha=alpha, rslora=rslora, init="pissa")
    x = torch.randn(5, in_features, dtype=dtype)
    with torch.no_grad():
        bound = 64 * torch.finfo(dtype).eps * abs_scale(x, module) * (in_features + rank)
        assert bool(((module(x) - original(x)).abs() <= bound + 1e-30).all())
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    keep = min(rank, s.numel())
    principal = u[:, :keep] @ torch.diag(s[:keep]) @ vh[:keep]
    update = module.scaling * module.lora_B.detach().double() @ module.lora_A.detach().double()
    tolerance = 1e3 * torch.finfo(dtype).eps * float(s[0])
    if keep < s.numel() and float(s[keep - 1] - s[keep]) < 1e-3 * float(s[0]):
        return  # a repeated singular value at the cut: the principal subspace is not unique
    torch.testing.assert_close(update, principal, rtol=0, atol=tolerance)
    residual = torch.linalg.svdvals(dense(module))
    torch.testing.assert_close(residual[: s.numel() - keep], s[keep:], rtol=0, atol=tolerance)
    a, b = module.lora_A.detach().double()[:keep], module.lora_B.detach().double()[:, :keep]
    torch.testing.assert_close(a @ a.T, b.T @ b, rtol=0, atol=tolerance / module.scaling)  # balanced factors


def test_a_layer_entering_lora_later_starts_from_its_current_principal_part():
    torch.manual_seed(0)
    module = LoRALinear(torch.nn.Linear(12, 10), rank=3, init="pissa", mode=Mode.FULL)
    simulate_training(module)
    x = torch.randn(4, 12)
    before = module(x).detach()
    module.set_mode(Mode.LORA)
    assert float(module.lora_B.abs().max()) > 0  # not a B = 0 start
    torch.testing.assert_close(module(x), before, rtol=0, atol=1e-5)


def test_inject_and_the_optimizer_take_pissa_and_refuse_it_with_4bit():
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    tokens = token_batch()
    opt = AdaptiveOptimizer(model, lr=1e-3, init_lora_weights="pissa", rank=2)  # PEFT's name
    assert all(m.init == "pissa" and float(m.lora_B.abs().max()) > 0 for m in opt.layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=1e-5)
    pytest.importorskip("bitsandbytes")
    fresh = tiny_llama()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="pissa.*quantize|quantize.*pissa"):
        inject_adapters(fresh, init="pissa", quantize="nf4")
    assert not find_adapters(fresh) and all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="init must be one of"):
        inject_adapters(fresh, init="gaussian")
