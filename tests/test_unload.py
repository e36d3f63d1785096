"""merge_and_unload leaves a plain model computing the same function; disable_adapters gives the base
function back inside its block, and refuses layers whose update lives in the base weight."""
from __future__ import annotations

import copy

import pytest
import torch

from adaptopt import LoRALinear, Mode, disable_adapters, find_adapters, inject_adapters, merge_and_unload
from tests.helpers import randomize_adapter
from tests.tiny_models import tiny_gpt2, tiny_llama, token_batch


def trained(model, **inject):
    layers = inject_adapters(model, rank=2, alpha=5, **inject)
    for layer in layers.values():
        randomize_adapter(layer, std=0.2)
    return layers


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merge_and_unload_keeps_the_function_and_leaves_no_adapter(build):
    torch.manual_seed(0)
    model = build()
    plain_keys = set(model.state_dict())
    layers = trained(model)
    names = list(layers)
    layers[names[0]].set_mode(Mode.FULL)
    layers[names[1]].merge()
    layers[names[2]].set_mode(Mode.FROZEN)
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits
        assert merge_and_unload(model) is model
        got = model(x).logits
    assert not find_adapters(model) and set(model.state_dict()) == plain_keys
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_merge_and_unload_of_4bit_layers_gives_dense_layers():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = tiny_llama()
    trained(model, quantize="nf4")
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits
        merge_and_unload(model)
        got = model(x).logits
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_merge_and_unload_refuses_a_non_finite_update_and_changes_nothing():
    model = tiny_llama()
    layers = trained(model)
    with torch.no_grad():
        list(layers.values())[-1].lora_B[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_and_unload(model)
    assert find_adapters(model).keys() == layers.keys()
    assert all(torch.allclose(p, before[n], rtol=0, atol=0, equal_nan=True) for n, p in model.named_parameters())


def test_disable_adapters_gives_the_base_function_inside_the_block():
    torch.manual_seed(0)
    base = tiny_llama()
    model = copy.deepcopy(base)
    trained(model)
    x = token_batch()
    with torch.no_grad():
        adapted = model(x).logits
        assert not torch.allclose(adapted, base(x).logits)
        with disable_adapters(model):
            assert torch.equal(model(x).logits, base(x).logits)
        assert torch.equal(model(x).logits, adapted)


def test_disable_adapters_refuses_layers_whose_update_is_in_the_weight():
    torch.manual_seed(0)
    model = tiny_llama()
    layers = trained(model)
    full = next(iter(layers))
    layers[full].set_mode(Mode.FULL)
    with pytest.raises(ValueError, match=full.replace(".", r"\.") + ".*strict=False"):
        with disable_adapters(model):
            pass
    with disable_adapters(model, strict=False):
        states = {n: m.adapters_disabled for n, m in layers.items()}
    assert not states[full] and all(v for n, v in states.items() if n != full)
    assert not any(m.adapters_disabled for m in model.modules() if isinstance(m, LoRALinear))
