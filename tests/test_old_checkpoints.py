"""Checkpoints written by adaptopt 0.1.0 (``tests/fixtures/v1``, made by
``tests/fixtures/make_v1_checkpoints.py`` before the layer-layout refactor) still load: adapters
into a fresh base model, and the optimizer + model state dicts into a fresh run built the same
way, each computing the logits the saved model computed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptopt import AdaptiveOptimizer, Mode, find_adapters, load_adapters
from tests.tiny_models import tiny_bert, tiny_llama, token_batch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"
CASES = {"bert_mixed": (lambda: tiny_bert(layers=2, dropout=0.0), None),
         "llama_nf4_mixed": (lambda: tiny_llama(layers=2), "nf4")}


def base_model(case: str) -> torch.nn.Module:
    model = CASES[case][0]()
    model.load_state_dict(load_file(str(FIXTURES / case / "base.safetensors")))
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch(3, 6, seed=7)).logits


def saved_modes(folder: Path) -> dict[str, tuple[str, int]]:
    layers = json.loads((folder / "adapters.json").read_text())["layers"]
    return {name: (r["mode"], r["rank"]) for name, r in layers.items()}


@pytest.mark.parametrize("adapters", ["adapters", "adapters_merged"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_old_adapters_load_into_a_fresh_base(case, adapters):
    if CASES[case][1]:
        pytest.importorskip("bitsandbytes")
    model = base_model(case)
    layers = load_adapters(model, FIXTURES / case / adapters)
    assert {n: (m.mode.value, m.rank) for n, m in layers.items()} == saved_modes(FIXTURES / case / adapters)
    expected = torch.load(FIXTURES / case / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_optimizer_state_resumes(case):
    if CASES[case][1]:
        pytest.importorskip("bitsandbytes")
    model = base_model(case)
    opt = AdaptiveOptimizer(model, lr=1e-2, policy="lora", rank=4, alpha=8, quantize=CASES[case][1])
    state = torch.load(FIXTURES / case / "optimizer.pt", weights_only=True)
    with pytest.warns(UserWarning, match="written with policy"):  # saved by a Fixed policy, loaded by LoRA
        opt.load_state_dict(state)
    model.load_state_dict(torch.load(FIXTURES / case / "model_state.pt", weights_only=True), strict=False)
    model.eval()
    assert {n: (m.mode.value, m.rank) for n, m in find_adapters(model).items()} == \
        {n: (r["mode"], r["rank"]) for n, r in state["layers"].items()}
    assert any(m.mode is Mode.FULL for m in opt.layers.values())
    expected = torch.load(FIXTURES / case / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert opt.step_count == state["step"]
