"""A model with adapters saves its state dict under the plain layer names (adaptopt/layers/state_dict_keys.py):
the plain architecture loads the trained function from it, and the adapted model loads it back exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from adaptopt import LoRALinear, Mode
from tests.helpers import abs_scale, make_base, simulate_training

STATES = ["frozen", "full", "lora", "lora_merged", "lora_cut"]
ADAPTER_KEYS = ("lora_A", "lora_B", "base.weight")


def adapted(bases: list[nn.Module], states: list[str], rank: int, alpha: float) -> nn.Sequential:
    """Each base wrapped, moved to its state and trained a little (a non-zero update)."""
    layers = []
    for base, state in zip(bases, states):
        layer = LoRALinear(base, rank=rank, alpha=alpha)
        if state == "full":
            layer.set_mode(Mode.FULL)
        simulate_training(layer)
        if state == "frozen":
            layer.set_mode(Mode.FROZEN)
        if state == "lora_cut":
            layer.set_mode(Mode.LORA, rank=max(1, rank - 1))
        if state == "lora_merged":
            layer.merge()
        layers.append(layer)
    return nn.Sequential(*layers)


@given(kinds=st.lists(st.sampled_from(["linear", "conv1d"]), min_size=1, max_size=3),
       states=st.lists(st.sampled_from(STATES), min_size=3, max_size=3),
       rank=st.integers(1, 5), alpha=st.sampled_from([1.0, 3.0, 16.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_the_plain_model_loads_the_trained_function_and_the_adapted_one_loads_it_exactly(
        kinds, states, rank, alpha, dtype, seed):
    torch.manual_seed(seed)
    width = 6
    bases = [make_base(kind, width, width, dtype=dtype) for kind in kinds]
    plain = nn.Sequential(*copy.deepcopy(bases))
    model = adapted(bases, states, rank, alpha)
    x = torch.randn(4, width, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    state = model.state_dict()

    result = plain.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    assert all(k.endswith(ADAPTER_KEYS) for k in result.unexpected_keys), result.unexpected_keys
    with torch.no_grad():
        got = plain(x)
        bound = 64 * torch.finfo(dtype).eps * abs_scale(x, model[0]).max()
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=float(bound) * scale * 4 ** len(kinds))

    fresh = adapted([make_base(k, width, width, dtype=dtype) for k in kinds], ["lora"] * len(kinds), rank + 1, alpha)
    fresh.load_state_dict(state)  # strict: every key is placed
    for saved, loaded in zip(model, fresh):
        assert loaded.layout().structure()[2:] == saved.layout().structure()[2:]  # factors, delta
        assert saved.lora_A is None or loaded.rank == saved.rank  # without factors the rank is the optimizer's
        assert loaded.merged == saved.merged
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_the_state_dict_copies_only_what_plain_loaders_need():
    layer = LoRALinear(nn.Linear(4, 3), rank=2)
    simulate_training(layer)
    keys = set(layer.state_dict())
    assert keys == {"weight", "bias", "base.weight", "lora_A", "lora_B"}
    layer.merge()
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.state_dict()["weight"] is layer.base.weight.detach() or torch.equal(
        layer.state_dict()["weight"], layer.base.weight)
    layer.unmerge()
    layer.set_mode(Mode.FULL)
    state = layer.state_dict(keep_vars=True)
    assert set(state) == {"weight", "bias"} and state["weight"] is layer.base.weight  # renamed, not copied


def test_a_state_dict_in_the_earlier_format_still_loads():
    layer = LoRALinear(nn.Linear(4, 3), rank=2)
    simulate_training(layer)
    old = {"base.weight": layer.base.weight.detach().clone(), "base.bias": layer.base.bias.detach().clone(),
           "lora_A": layer.lora_A.detach().clone(), "lora_B": layer.lora_B.detach().clone()}
    fresh = LoRALinear(nn.Linear(4, 3), rank=3, mode=Mode.FULL)
    fresh.load_state_dict(old)
    x = torch.randn(2, 4)
    assert fresh.mode is Mode.LORA and fresh.rank == 2 and torch.equal(fresh(x), layer(x))


def test_a_4bit_layer_keeps_its_packed_weight_under_the_plain_name():
    pytest.importorskip("bitsandbytes")
    from adaptopt import QuantLoRALinear
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = QuantLoRALinear(copy.deepcopy(base), rank=2)
    simulate_training(layer)
    state = layer.state_dict()
    assert state["weight"].dtype == torch.uint8 and "weight.absmax" in state  # a dense layer refuses its shape
    with pytest.raises(RuntimeError, match="size mismatch"):
        nn.Linear(16, 8).load_state_dict(state, strict=False)
    fresh = QuantLoRALinear(copy.deepcopy(base), rank=4, mode=Mode.FULL)
    fresh.load_state_dict(state)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), layer(x))
    other = QuantLoRALinear(nn.Linear(16, 8), rank=2)  # quantized from other weights
    with pytest.raises(RuntimeError, match="4-bit base was quantized from other weights"):
        other.load_state_dict(state)


def test_torch_distributed_checkpoint_full_state_dict_round_trip():
    """torch.distributed.checkpoint's get/set_model_state_dict (what FSDP2 users save with) key on
    parameter names; set_model_state_dict adds the model's current values under names such as
    ``base.weight`` beside the saved plain ``weight`` of a layer saved without factors. Those
    fill-ins must not win: the trained weights load exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from adaptopt import AdaptiveOptimizer, LayerDecision, Policy
    from tests.tiny_models import tiny_bert, token_batch

    class Mixed(Policy):
        method = "mixed"

        def initial(self, layers, scores):
            return {n: LayerDecision(Mode.FULL if "layer.0." in n else Mode.LORA) for n in layers}

    def build():
        torch.manual_seed(0)
        model = tiny_bert(dropout=0.0)
        return model, AdaptiveOptimizer(model, lr=1e-2, policy=Mixed(), rank=2, alpha=3.0)

    model, opt = build()
    for _ in range(2):
        model(input_ids=token_batch(), labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    options = StateDictOptions(full_state_dict=True)
    saved, saved_opt = get_model_state_dict(model, options=options), opt.state_dict()
    fresh, fresh_opt = build()
    fresh_opt.load_state_dict(saved_opt)
    set_model_state_dict(fresh, saved, options=options)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name
