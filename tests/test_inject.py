"""Target detection and in-place injection on tiny HF models and plain modules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptopt import LoRALinear, Mode, QuantLoRALinear, TargetInfo, find_adapters, inject_adapters, select_targets
from tests.tiny_models import tiny_bert, tiny_distilbert, tiny_gpt2, tiny_llama, token_batch

LLAMA = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
CASES = {
    "llama": (tiny_llama, "model.layers.{}.", LLAMA),
    "gpt2": (tiny_gpt2, "transformer.h.{}.", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "bert": (tiny_bert, "bert.encoder.layer.{}.", ["attention.self.query", "attention.self.key",
                                                   "attention.self.value", "attention.output.dense",
                                                   "intermediate.dense", "output.dense"]),
    "distilbert": (tiny_distilbert, "distilbert.transformer.layer.{}.",
                   ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1",
                    "ffn.lin2"]),
}


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("arch", sorted(CASES))
def test_auto_targets_per_architecture_and_logits_unchanged(arch):
    build, block, types = CASES[arch]
    torch.manual_seed(0)
    model = build()
    tokens = token_batch()
    before = logits(model, tokens)
    adapters = inject_adapters(model, rank=4, alpha=8)
    expected = [block.format(i) + t for i in range(2) for t in types]
    assert list(adapters) == expected
    assert all(isinstance(m, LoRALinear) and m.mode is Mode.LORA for m in adapters.values())
    assert find_adapters(model) == adapters
    assert torch.equal(logits(model, tokens), before)  # B = 0: injection changes nothing
    first = adapters[expected[-1]]
    assert first.target == TargetInfo(expected[-1], block.format(1)[:-1], 1, types[-1])
    assert (first.block_index, first.layer_type) == (1, types[-1])


def test_gpt2_conv1d_targets_are_fan_in_fan_out():
    adapters = inject_adapters(tiny_gpt2(), rank=2, alpha=4)
    assert all(m.fan_in_fan_out for m in adapters.values())
    assert adapters["transformer.h.0.attn.c_attn"].out_features == 48


def test_only_adapters_receive_gradients_after_injection():
    model = tiny_llama()
    adapters = inject_adapters(model, rank=2, alpha=4)
    for p in model.parameters():
        if not any(p is a for m in adapters.values() for a in (m.lora_A, m.lora_B)):
            p.requires_grad_(False)
    model(input_ids=token_batch(), labels=token_batch()).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{name}.{f}" for name in adapters for f in ("lora_A", "lora_B")}


class CustomNet(nn.Module):
    """An unknown architecture: fallback targets every linear layer except output heads."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.side = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 3)
        self.lm_head = nn.Linear(8, 5)
        self.score = nn.Linear(8, 1)

    def forward(self, x):
        h = self.side(self.encoder(x))
        return self.classifier(h), self.lm_head(h), self.score(h)


def test_fallback_targets_every_linear_except_heads():
    assert select_targets(CustomNet()) == ["encoder.0", "encoder.2", "side"]
    info = TargetInfo.from_name("encoder.2")
    assert (info.block_name, info.block_index, info.layer_type) == ("encoder.2", 2, "encoder")


def test_targets_as_names_and_regex():
    model = tiny_bert()
    assert select_targets(model, ["query", "value"]) == [f"bert.encoder.layer.{i}.attention.self.{t}"
                                                         for i in range(2) for t in ("query", "value")]
    assert select_targets(model, r"attention\.self\.(query|key)") == [
        f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "key")]
    assert select_targets(model, r"bert\.encoder\.layer\.1\..*dense") == [
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense"]
    # a container name selects the linear layers it matches, never the container itself
    assert select_targets(model, ["pooler.dense", "classifier"]) == ["bert.pooler.dense", "classifier"]


def test_quantized_injection_equals_the_model_with_dequantized_weights():
    """Parity: a 4-bit-injected model computes what the plain model computes with each target
    weight replaced by its dequantized 4-bit version (built here by hand, another way)."""
    pytest.importorskip("bitsandbytes")
    import copy
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    adapters = inject_adapters(model, rank=4, alpha=8, quantize="nf4")
    assert all(isinstance(m, QuantLoRALinear) and m.quant_type == "nf4" for m in adapters.values())
    reference_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in adapters.items():
            reference_modules[name].weight.copy_(module.dequantized_weight())
    tokens = token_batch()
    torch.testing.assert_close(logits(model, tokens), logits(reference, tokens), rtol=1e-5, atol=1e-5)


def test_quantized_gpt2_forward_and_transition():
    pytest.importorskip("bitsandbytes")
    model = tiny_gpt2()
    adapters = inject_adapters(model, rank=2, alpha=4, quantize={"quant_type": "fp4"})
    tokens = token_batch()
    before = logits(model, tokens)
    for module in adapters.values():
        module.set_mode(Mode.FULL)
    torch.testing.assert_close(logits(model, tokens), before, rtol=1e-5, atol=1e-5)
