"""Run configs: the methods framework's keys map onto AdaptiveOptimizer arguments; bad keys name themselves."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("yaml")
from adaptopt.cli.config import ConfigError, load_yaml, normalise  # noqa: E402
from adaptopt.cli.methods import optimizer_kwargs  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE = {"model": "minilm", "data": "rotten_tomatoes"}


def kwargs_for(fine_tuning: dict) -> dict:
    config = normalise({**BASE, "fine_tuning": fine_tuning}, "t.yaml")
    return optimizer_kwargs(config["fine_tuning"], config["training"], "t.yaml: fine_tuning")


def test_a_memory_budget_counts_the_runs_own_step():
    """A method's budget wins over training's; its activations are the run's batch at max_length."""
    config = normalise({**BASE, "training": {"memory_budget": "lora+10%", "batch_size": 4, "max_length": 32},
                        "fine_tuning": {"method": "lisa", "memory_budget": "2GB"}}, "t.yaml")
    budget = optimizer_kwargs(config["fine_tuning"], config["training"], "t")["memory_budget"]
    assert (budget.limit, budget.batch_size, budget.seq_len) == ("2GB", 4, 32)
    assert "memory_budget" not in kwargs_for({"method": "lisa"})


def test_the_seed_lora_and_qlora_blocks_map_verbatim():
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "bias": "none",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    k = kwargs_for({"method": "lora", "lora": lora})
    assert (k["rank"], k["alpha"], k["dropout"], k["targets"]) == (16, 32.0, 0.05, lora["target_modules"])
    assert k["policy"] == {"method": "lora", "rank": 16} and "quantize" not in k
    quantization = {"bits": 4, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_use_double_quant": True}
    k = kwargs_for({"method": "qlora", "lora": lora, "quantization": quantization})
    assert k["quantize"] == {"quant_type": "nf4", "compute_dtype": torch.bfloat16, "double_quant": True,
                             "blocksize": 64}
    assert kwargs_for({"method": "lora", "lora": {**lora, "bias": "all"}})["trainable"][-1] == "bias"


def test_the_seed_spectrum_block_maps_to_a_percentile_or_fixed_blocks():
    k = kwargs_for({"method": "spectrum", "spectrum": {"snr_threshold": 0.5, "layers_to_finetune": "auto"}})
    assert k["policy"] == {"method": "spectrum", "top_percent": 50.0}
    k = kwargs_for({"method": "spectrum", "spectrum": {"snr_threshold": 0.75}})
    assert k["policy"]["top_percent"] == 25.0
    k = kwargs_for({"method": "spectrum", "spectrum": {"layers_to_finetune": [0, 5]}})
    assert k["policy"]["method"] == "fixed" and k["policy"]["default"] == "frozen"
    from adaptopt import build_policy
    from adaptopt.policies import name_matches
    patterns = list(build_policy(k["policy"]).assignment)
    assert any(name_matches(p, "bert.encoder.layer.5.attention.self.query") for p in patterns)
    assert not any(name_matches(p, "bert.encoder.layer.4.attention.self.query") for p in patterns)
    assert not any(name_matches(p, "bert.encoder.layer.15.output.dense") for p in patterns)


def test_trainable_patterns_add_to_the_head_from_training_or_the_method():
    config = normalise({**BASE, "training": {"trainable": "LayerNorm"},
                        "compare": {"methods": ["lora", {"method": "hybrid", "trainable": ["bias"]}]}}, "t.yaml")
    lora, hybrid = (optimizer_kwargs(m, config["training"], "t.yaml") for m in config["methods"])
    assert lora["trainable"] == ("classifier", "score", "LayerNorm")
    assert hybrid["trainable"] == ("classifier", "score", "bias")  # the method's own list wins
    from adaptopt import AdaptiveOptimizer
    from tests.tiny_models import tiny_bert
    model = tiny_bert()
    AdaptiveOptimizer(model, **{**lora, "policy": "lora"})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in dict(model.named_parameters()) if "LayerNorm" in n}
    assert norms and norms <= trained
    assert not any("word_embeddings" in n or n.endswith("query.base.weight") for n in trained)


def test_shipped_example_configs_validate():
    from adaptopt.cli.main import CONFIGS, DEMO_CONFIG, config_path
    paths = [*EXAMPLES.glob("*.yaml"), *CONFIGS.glob("*.yaml")]
    assert DEMO_CONFIG in paths and config_path("main_job") == DEMO_CONFIG  # one file, shipped as package data
    for path in paths:
        config = normalise(load_yaml(path), str(path))
        for method in config["methods"] or [config["fine_tuning"]]:
            optimizer_kwargs(method, config["training"], str(path))
    demo = normalise(load_yaml(DEMO_CONFIG), "demo")
    labels = [m["method"] for m in demo["methods"]]
    assert labels == ["full", "lora", "hybrid", "hybrid", "automode"]  # demo --quick runs the first three
    assert demo["methods"][1]["lora"]["r"] == 16  # the file's lora section applies to every method


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "fine_tuning": {"method": "lora", "lora": {"rnak": 8}}}, "fine_tuning.lora: unknown key(s) ['rnak']"),
    ({**BASE, "fine_tuning": {"method": "qlora", "quantization": {"bits": 8}}}, "only 4-bit"),
    ({**BASE, "fine_tuning": {"method": "spectrum", "spectrum": {"snr_threshold": 2}}}, "percentile in [0, 1)"),
    ({**BASE, "compare": {"methods": ["full", "loar"]}}, "compare.methods[1].method: unknown method 'loar'"),
    ({"data": "rotten_tomatoes"}, "missing key 'model'"),
    ({**BASE, "trainin": {}}, "unknown key(s) ['trainin']"),
    ({**BASE, "training": {"trainable": [3]}}, "training.trainable: expected a list of parameter name patterns"),
    ({**BASE, "compare": {"methods": [{"method": "lora", "trainable": ["Layer[Norm"]}]}},
     "compare.methods[0].trainable: invalid name pattern 'Layer[Norm'"),
    ({**BASE, "training": {"memory_budget": "plenty"}}, "training.memory_budget: expected bytes"),
    ({**BASE, "fine_tuning": {"method": "hybrid", "memory_budget": "25%"}}, "fine_tuning.memory_budget: expected"),
])
def test_bad_configs_name_the_file_and_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config = normalise(raw, "bad.yaml")
        optimizer_kwargs(config["fine_tuning"], config["training"], "bad.yaml: fine_tuning")
    assert message in str(err.value) and "bad.yaml" in str(err.value)


def test_a_registered_policy_can_be_named_in_yaml(tmp_path, monkeypatch):
    """The CLI's method names come from the policy registry: a user's policy registered in a module
    named under `plugins:` is a method like any other (and an unknown name lists the registry)."""
    from adaptopt import POLICIES
    from adaptopt.cli.config import methods
    module = tmp_path / "my_policies_for_test.py"
    module.write_text("from adaptopt import LoRA, register_policy\n\n@register_policy\nclass Mine(LoRA):\n"
                      "    method = 'mine_for_test'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"model": "minilm", "data": "rotten_tomatoes", "fine_tuning": {"method": "mine_for_test",
                                                                         "mine_for_test": {"rank": 4}}}
    with pytest.raises(ConfigError, match="unknown method 'mine_for_test'.*plugins"):
        normalise(raw, "x.yaml")
    try:
        config = normalise({**raw, "plugins": ["my_policies_for_test"]}, "x.yaml")
        assert "mine_for_test" in methods()
        kwargs = optimizer_kwargs(config["fine_tuning"], config["training"], "x")
        assert kwargs["policy"] == {"method": "mine_for_test", "rank": 4}
        with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_module_x'"):
            normalise({**raw, "plugins": ["no_such_module_x"]}, "x.yaml")
    finally:
        POLICIES.pop("mine_for_test", None)
