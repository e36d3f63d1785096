"""The examples users copy from must keep running."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_loop_example_promotes_without_changing_the_model_and_then_trains():
    result = load("raw_loop").main()
    assert result["logit_change"] < 1e-5
    assert result["moved"] > 0
    assert result["accuracy"] > result["majority"]


def test_every_policy_example_in_the_readme_runs():
    """The README's "One example each" block, line by line, on a tiny model and a fake loader."""
    import re

    import torch

    from tests.tiny_models import tiny_bert, token_batch
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("One example each:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    imports, lines = block.split("\n\n", 1)
    namespace: dict = {"loader": [None] * 6}
    exec(imports, namespace)
    calls = [line for line in lines.splitlines() if line.startswith("AdaptiveOptimizer(")]
    assert len(calls) == 12
    for line in calls:
        if "QLoRA" in line or "ALoRS" in line:
            pytest.importorskip("bitsandbytes")
        model = tiny_bert(layers=6)
        code = re.sub(r"^AdaptiveOptimizer\(model,", "AdaptiveOptimizer(model, rank=4,", line.split("  #")[0])
        code = code.replace("LoRA(16)", "LoRA(4)").replace("QLoRA(16)", "QLoRA(4)").replace("r_high=16", "r_high=8")
        opt = eval(code, {**namespace, "model": model})
        for i in range(2):
            model(input_ids=token_batch(seed=i), labels=torch.tensor([0, 1])).loss.backward()
            opt.step()
            opt.zero_grad()
        assert opt.trainable_parameter_count() > 0, line
