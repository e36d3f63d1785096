"""PEFT's names (r, lora_alpha, lora_dropout, target_modules, use_rslora) mean the same as ours, in the
Python API and in YAML; the same setting under both names, or an unknown argument, is refused by name."""
from __future__ import annotations

import pytest

from adaptopt import AdaptiveOptimizer, AutoMode, LoRA, QLoRA, build_policy, inject_adapters
from adaptopt.peft_arguments import PEFT_NAMES
from tests.tiny_models import tiny_bert, tiny_llama


def layer_settings(layers):
    return {n: (m.rank, m.alpha, float(getattr(m.dropout, "p", 0.0)), m.rslora) for n, m in layers.items()}


def test_the_optimizer_and_inject_take_pefts_names():
    # policy="lora": only the targets (the default Hybrid adds its output adapter on lm_head)
    ours = AdaptiveOptimizer(tiny_llama(), rank=4, alpha=8, dropout=0.1, targets=["q_proj"], rslora=True, policy="lora")
    peft = AdaptiveOptimizer(tiny_llama(), r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"],
                             use_rslora=True, policy="lora")
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


def test_all_linear_means_what_it_means_in_peft():
    """Every linear layer except the output layer: the model's output embeddings and the heads."""
    from adaptopt import select_targets
    llama = tiny_llama()
    chosen = select_targets(llama, "all-linear")
    assert "lm_head" not in chosen and len(chosen) == 7 * 2  # q k v o gate up down, two blocks
    bert = tiny_bert()
    chosen = select_targets(bert, "all-linear")
    assert "bert.pooler.dense" in chosen and "classifier" not in chosen  # outside blocks too, never the head
    assert set(select_targets(bert, "auto")) < set(chosen)
    opt = AdaptiveOptimizer(tiny_llama(), target_modules="all-linear", policy="lora", r=2)
    assert len(opt.layers) == 14


def test_bias_modules_to_save_and_task_type_take_their_peft_meaning():
    def trained(opt):
        return {n for n, p in opt.model.named_parameters() if p.requires_grad}
    every = trained(AdaptiveOptimizer(tiny_bert(), policy="lora", rank=2, bias="all"))
    assert {n.replace(".base.", ".") for n in every if n.endswith("bias")} == {
        n for n, _ in tiny_bert().named_parameters() if n.endswith("bias")}
    only = trained(AdaptiveOptimizer(tiny_bert(), policy="lora", rank=2, bias="lora_only"))
    biases = {n for n in only if n.endswith("bias")}
    assert biases and all(n.endswith(".base.bias") for n in biases - {"classifier.bias"})
    assert not any("LayerNorm" in n for n in biases)
    saved = trained(AdaptiveOptimizer(tiny_llama(), policy="lora", rank=2, modules_to_save=["norm"]))
    assert {"model.norm.weight"} <= saved
    AdaptiveOptimizer(tiny_llama(), policy="lora", rank=2, task_type="CAUSAL_LM")  # agrees with the model: taken
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS', but the model is a LlamaForCausalLM \(CAUSAL_LM\)"):
        AdaptiveOptimizer(tiny_llama(), policy="lora", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"bias='some': PEFT's values are \['none', 'all', 'lora_only'\]"):
        AdaptiveOptimizer(tiny_llama(), policy="lora", bias="some")
    with pytest.raises(ValueError, match="modules_to_save must be a list of module names"):
        AdaptiveOptimizer(tiny_llama(), policy="lora", modules_to_save="norm")
