"""Bad input: a clear error naming the problem and the fix, and the model left exactly as it was."""
from __future__ import annotations

import math
import sys

import pytest
import torch

import adaptopt.surgery.inject
from adaptopt import LoRALinear, Mode, QuantLoRALinear, inject_adapters
from tests.helpers import assert_same_snapshot, make_base, randomize_adapter, snapshot
from tests.tiny_models import tiny_bert, tiny_llama


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": ["no_such_layer"]}, "no target layers matched"),
    ({"targets": r"nothing\.here"}, "no target layers matched"),
    ({"targets": ["embed_tokens"]}, "only non-linear modules"),
    ({"targets": []}, "non-empty list"),
    ({"targets": 42}, "targets must be"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"alpha": -1.0}, "alpha must be a finite number > 0"),
    ({"alpha": math.nan}, "alpha must be a finite number > 0"),
    ({"quantize": "int3"}, "unknown quant type 'int3'"),
    ({"quantize": {"quant_type": "nf4", "bits": 4}}, r"unknown quantize keys \['bits'\]"),
    ({"quantize": {"blocksize": 100}}, "blocksize must be a power of two"),
    ({"mode": "half"}, "unknown mode 'half'"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_injection_arguments_raise_and_leave_the_model_unchanged(kwargs, message):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        inject_adapters(model, **{"rank": 4, "alpha": 8, **kwargs})
    assert_same_snapshot(before, snapshot(model))


def test_injecting_twice_is_refused():
    model = tiny_bert()
    inject_adapters(model, rank=2, alpha=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has 12 adapters.*find_adapters"):
        inject_adapters(model)
    assert_same_snapshot(before, snapshot(model))


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ImportError, match=r"pip install 'adaptopt\[quant\]'"):
        inject_adapters(model, quantize="nf4")
    assert_same_snapshot(before, snapshot(model))


def test_a_failure_midway_through_injection_restores_everything(monkeypatch):
    built = []

    class FailsOnThird(LoRALinear):
        def __init__(self, *args, **kwargs):
            if len(built) == 2:
                raise RuntimeError("out of memory")
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(adaptopt.surgery.inject, "LoRALinear", FailsOnThird)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="out of memory"):
        inject_adapters(model)
    assert len(built) == 2
    assert_same_snapshot(before, snapshot(model))  # the first two bases were un-frozen again


def _poison(module: LoRALinear) -> None:
    with torch.no_grad():
        module.lora_B[0, 0] = float("nan")


@pytest.mark.parametrize("quantized", [False, True])
def test_non_finite_update_refuses_merge_and_transitions(quantized):
    torch.manual_seed(0)
    base = make_base("linear", 8, 6)
    if quantized:
        pytest.importorskip("bitsandbytes")
        module = QuantLoRALinear(base, rank=2, alpha=4)
    else:
        module = LoRALinear(base, rank=2, alpha=4)
    randomize_adapter(module)
    _poison(module)
    before = snapshot(module)
    for action in (module.merge, lambda: module.set_mode(Mode.FULL), lambda: module.set_mode(Mode.LORA, 1),
                   lambda: module.set_mode(Mode.FROZEN)):
        with pytest.raises(ValueError, match="NaN or inf.*left unchanged.*learning rate"):
            action()
        assert_same_snapshot(before, snapshot(module))
        assert module.mode is Mode.LORA and module.rank == 2 and not module.merged


def test_wrapping_something_that_is_not_linear():
    with pytest.raises(TypeError, match="nn.Linear and GPT-2-style Conv1D.*Embedding"):
        LoRALinear(torch.nn.Embedding(10, 4))


@pytest.mark.parametrize("bad", [0, -1, None, "8"])
def test_set_mode_with_a_bad_rank_changes_nothing(bad):
    module = LoRALinear(make_base("linear", 4, 4), rank=2, alpha=4)
    before = snapshot(module)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        module.set_mode(Mode.LORA, rank=bad) if bad is not None else module.set_mode(Mode.LORA, rank=0)
    assert_same_snapshot(before, snapshot(module))


def test_mode_coercion():
    assert Mode.coerce("LoRA") is Mode.LORA and Mode("full") is Mode.FULL and str(Mode.FROZEN) == "frozen"
    with pytest.raises(ValueError, match="use one of 'frozen', 'lora', 'full'"):
        Mode.coerce("partial")
