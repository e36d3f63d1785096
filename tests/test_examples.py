"""The examples users copy from must keep running."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from adaptopt.formats.checkpoint import adapters_file

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their shared synthetic_task module


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


def test_hf_trainer_example_trains_decides_and_saves(tmp_path):
    pytest.importorskip("accelerate")
    result = load("hf_trainer").main(str(tmp_path), epochs=3)
    assert result["steps_per_epoch"] == 32 and result["transitions"] >= 1
    assert result["accuracy"] > 0.6
    assert adapters_file(tmp_path / "adapters").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()


def test_accelerate_example_steps_once_per_accumulation():
    pytest.importorskip("accelerate")
    result = load("accelerate_loop").main(epochs=3)
    assert result["steps"] == 96  # 3 epochs × 64 batches / accumulation 2
    assert result["decisions"] and result["accuracy"] > 0.6


def test_accelerate_launch_with_two_processes_resumes_bit_for_bit(tmp_path):
    """`accelerate launch` (two processes over gloo on this CPU-only machine) runs the raw loop; a run
    stopped after one epoch and resumed from its checkpoint ends with the uninterrupted run's model."""
    import os
    import shutil
    import sys

    from tests.helpers import _run_in_own_group
    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLES)}

    def launch(*args):
        run = _run_in_own_group([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no",
                                 str(EXAMPLES / "accelerate_loop.py"), *map(str, args)], env, 300)
        assert run.returncode == 0, run.stderr[-3000:]
    launch(tmp_path / "whole")
    launch(tmp_path / "half", "--stop-after", 1)
    launch(tmp_path / "half", "--resume")
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "half" / "final.pt", weights_only=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 48 and len(result["decisions"]) >= 2  # 3 × 32 / 2 ranks


def test_save_load_export_example_reproduces_the_logits(tmp_path):
    pytest.importorskip("peft")
    gaps = load("save_load_export").main(str(tmp_path), steps=20)
    assert gaps["adapters"] == 0.0 and gaps["peft"] <= 1e-5 and gaps["merged"] <= 1e-5


def test_ddp_torchrun_example_keeps_ranks_identical(tmp_path):
    from tests.helpers import torchrun
    run = torchrun(EXAMPLES / "ddp_torchrun.py", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["ranks_identical"] and result["rebuilds"] >= 1


def test_fsdp2_torchrun_example_transitions_on_sharded_weights_and_resumes(tmp_path):
    from tests.helpers import torchrun
    run = torchrun(EXAMPLES / "fsdp2_torchrun.py", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["ranks_identical"] and result["resumed_equal"]
    assert result["transitions"] > 0 and {"lora", "full"} <= set(result["modes"].values())
    assert result["accuracy"] > 0.6  # it learned the planted task (chance: 0.5)


def test_every_policy_example_in_the_readme_runs():
    """docs/policies.md's "One example each" block, line by line, each optimizer trained two steps."""
    import re

    from tests.tiny_models import tiny_llama, token_batch
    readme = (EXAMPLES.parent / "docs" / "policies.md").read_text()
    block = readme.split("One example each:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    imports, lines = block.split("\n\n", 1)
    namespace: dict = {"loader": [None] * 6}
    exec(imports, namespace)
    calls = [line for line in lines.splitlines() if line.startswith("AdaptiveOptimizer(")]
    assert len(calls) == 16
    for line in calls:
        if "QLoRA" in line or "ALoRS" in line:
            pytest.importorskip("bitsandbytes")
        model = tiny_llama(layers=4)
        code = re.sub(r"^AdaptiveOptimizer\(tiny_llama\(\),", "AdaptiveOptimizer(model, rank=4,", line.split("  #")[0])
        code = code.replace("LoRA(16)", "LoRA(4)").replace("QLoRA(16)", "QLoRA(4)").replace("r_high=16", "r_high=8")
        code = code.replace("budget=16", "budget=4")
        opt = eval(code, {**namespace, "model": model})
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trained = set()
        for i in range(2):
            trained |= {n for n, p in model.named_parameters() if p.requires_grad}
            tokens = token_batch(seed=i)
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()
        moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
        folded = {f"{h['layer']}.base.weight" for h in opt.history}  # a transition may fold an update into W
        assert moved, f"{line}: two steps changed no parameter"
        assert moved <= trained | folded, f"{line}: parameters outside the optimizer moved: {sorted(moved - trained)}"
        assert opt.check_consistency()["trainable"] > 0, line


def test_lightning_example_resumes_exactly(tmp_path):
    pytest.importorskip("lightning")
    result = load("lightning_fit").main(str(tmp_path))
    assert result["steps_per_epoch"] == 32 and result["transitions"] >= 1  # 64 batches / accumulation 2
    assert result["resume_exact"] and result["accuracy"] > 0.6
