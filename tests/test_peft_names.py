"""PEFT's names (r, lora_alpha, lora_dropout, target_modules, use_rslora) mean the same as ours, in the
Python API and in YAML; the same setting under both names, or an unknown argument, is refused by name."""
from __future__ import annotations

import pytest

from adaptopt import AdaptiveOptimizer, AutoMode, LoRA, QLoRA, build_policy, inject_adapters
from adaptopt.peft_arguments import PEFT_NAMES
from tests.tiny_models import tiny_llama


def layer_settings(layers):
    return {n: (m.rank, m.alpha, float(getattr(m.dropout, "p", 0.0)), m.rslora) for n, m in layers.items()}


def test_the_optimizer_and_inject_take_pefts_names():
    ours = AdaptiveOptimizer(tiny_llama(), rank=4, alpha=8, dropout=0.1, targets=["q_proj"], rslora=True)
    peft = AdaptiveOptimizer(tiny_llama(), r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"],
                             use_rslora=True)
    assert layer_settings(peft.layers) == layer_settings(ours.layers) and len(ours.layers) == 2
    assert layer_settings(inject_adapters(tiny_llama(), r=3, lora_alpha=5)) == layer_settings(
        inject_adapters(tiny_llama(), rank=3, alpha=5))


def test_policies_take_r_directly_and_by_mapping():
    assert LoRA(r=16).rank == 16 and QLoRA(r=4).rank == 4 and AutoMode(r=2).rank == 2
    assert build_policy({"method": "lora", "r": 4}).rank == 4


@pytest.mark.parametrize("build", [
    lambda: AdaptiveOptimizer(tiny_llama(), r=4, rank=8),
    lambda: inject_adapters(tiny_llama(), lora_alpha=4, alpha=8),
    lambda: LoRA(r=3, rank=4),
    lambda: build_policy({"method": "lora", "r": 3, "rank": 4}),
])
def test_one_setting_under_two_names_is_refused(build):
    with pytest.raises(TypeError, match=r"got both .*= \(PEFT's name\) and .*=.*pass one"):
        build()


def test_an_unknown_argument_names_ours_and_adamws():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['lora_rank'\]: its own are .*'rank'.*AdamW"):
        AdaptiveOptimizer(model, lora_rank=4)
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing was injected


@pytest.mark.parametrize("spelling", [{"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
                                      {"rank": 4, "alpha": 8, "targets": ["q_proj"]},
                                      {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}])
def test_yaml_takes_all_three_spellings(spelling):
    from adaptopt.cli.config import ConfigError, normalise
    raw = {"model": "minilm", "data": "rotten_tomatoes", "fine_tuning": {"method": "lora", "lora": spelling}}
    assert normalise(raw)["fine_tuning"]["lora"] == {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(ConfigError, match="'rank' and 'r' are the same setting"):
        normalise({**raw, "fine_tuning": {"method": "lora", "lora": {"r": 4, "rank": 4}}})


def test_every_peft_name_maps_to_an_optimizer_argument():
    import inspect
    ours = inspect.signature(AdaptiveOptimizer.__init__).parameters
    assert all(name in ours for name in PEFT_NAMES.values())


def test_print_trainable_parameters_is_one_line_with_the_counts(capsys):
    model = tiny_llama()
    opt = AdaptiveOptimizer(model, r=2, policy={"method": "fixed", "assignment": {"layers\\.0": "full"},
                                                "default": "lora"})
    opt.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "\n" not in line and line.startswith(f"trainable params: {trainable:,} || all params: {total:,} ||")
    assert f"trainable%: {100 * trainable / total:.4f}" in line and line.endswith("layers: 7 full, 7 lora, 0 frozen")
    assert opt.summary().endswith(line)
