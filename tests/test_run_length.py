"""Decisions that depend on the run's length are fixed when the length is first known, saved with
the optimizer and kept on resume; a resume with another length warns once, naming both lengths
and the step kept. The documentation's Lightning resume pattern runs exactly as written."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from adaptopt import AdaptiveOptimizer, Hybrid
from tests.tiny_models import tiny_bert, token_batch

LABELS = torch.tensor([0, 1])


def train(opt, model, steps):
    for i in range(steps):
        model(input_ids=token_batch(seed=i), labels=LABELS).loss.backward()
        opt.step()
        opt.zero_grad()


def test_a_fraction_of_the_run_is_fixed_at_the_first_length_and_kept_on_resume():
    torch.manual_seed(0)
    model = tiny_bert(layers=3).train()
    policy = Hybrid(t=0, calibration_steps=2, freeze_at=0.6)  # no FULL block: the prefix is the lowest
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=policy, rank=2, total_steps=10)
    assert policy.freeze_step() == 6
    train(opt, model, 4)
    state = opt.state_dict()
    assert state["run_steps"] == 10

    torch.manual_seed(0)
    fresh = tiny_bert(layers=3).train()
    again = AdaptiveOptimizer(fresh, lr=1e-3, policy=Hybrid(t=0, calibration_steps=2, freeze_at=0.6), rank=2)
    again.load_state_dict(state)
    fresh.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"this run has 20 optimizer steps, but policy 'hybrid' placed decisions at "
                                         r"a fraction of the run when its length was first known \(10 steps\), and "
                                         r"keeps them: the prefix freezes after step 6"):
        again.set_total_steps(20)  # the resumed run is longer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.set_total_steps(30)  # once
    assert again.policy.freeze_step() == 6 and again.total_steps == 30
    train(again, fresh, 3)  # steps 5, 6, 7: the prefix froze after step 6, as in the first run's plan
    frozen_at = {h["step"] for h in again.history if h["reason"] == "decision" and h["mode"] == "frozen"}
    assert frozen_at == {6}


def test_a_length_given_twice_alike_or_to_a_policy_that_places_nothing_does_not_warn():
    opt = AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy={"method": "automode", "u": 2}, rank=2, total_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.set_total_steps(8)
        opt.set_total_steps(16)  # AutoMode places nothing by the run's length: the new length is taken
    assert opt.policy.run_steps == 16


def test_a_resume_that_brings_another_length_into_a_new_optimizer_warns_on_load():
    model = tiny_bert().train()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Hybrid(calibration_steps=2), rank=2, total_steps=10)
    state = opt.state_dict()
    other = AdaptiveOptimizer(tiny_bert().train(), lr=1e-3, policy=Hybrid(calibration_steps=2), rank=2,
                              total_steps=50)
    with pytest.warns(UserWarning, match=r"this run has 50 optimizer steps.*\(10 steps\).*after step 6"):
        other.load_state_dict(state)
    assert other.policy.run_steps == 10


@pytest.mark.parametrize("steps, first", [(2, 4), (4, 4)])
def test_a_run_shorter_than_the_schedule_warns_at_the_start(steps, first):
    with pytest.warns(UserWarning, match=rf"policy 'hybrid' makes its first decision at step {first}, but this run "
                                         rf"has {steps} optimizer steps: nothing it decides will train"):
        AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy=Hybrid(calibration_steps=4), rank=2, total_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy=Hybrid(calibration_steps=4), rank=2, total_steps=5)  # 4 < 5
        AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy="lora", rank=2, total_steps=2)  # static: nothing to say


def _lightning_block() -> str:
    page = (Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    return next(code for code in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "AdaptoptLightning()" in code)


def test_the_documented_lightning_resume_equals_one_two_epoch_fit(tmp_path, monkeypatch):
    """The docs' pattern, run exactly as written (after the page's setup block): fit one epoch, save,
    resume to two; then one uninterrupted two-epoch fit from the same seed: the same model."""
    pytest.importorskip("lightning")
    page = (Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    setup = re.findall(r"```python\n(.*?)```", page, flags=re.S)[:2]  # tiny_llama; from adaptopt import ...
    monkeypatch.chdir(tmp_path)
    session: dict = {}
    for code in setup:
        exec(code, session)
    torch.manual_seed(0)
    exec(_lightning_block(), session)
    resumed = session["resumed"].lightning_module
    torch.manual_seed(0)
    L = session["L"]
    data = torch.utils.data.DataLoader(torch.randint(0, 256, (32, 32)), batch_size=4)  # as the block draws it
    whole = L.Trainer(max_epochs=2, callbacks=[session["AdaptoptLightning"]()], logger=False,
                      default_root_dir="run/whole")
    whole.fit(session["LanguageModel"](), data)
    expected = dict(whole.lightning_module.named_parameters())
    got = dict(resumed.named_parameters())
    assert got.keys() == expected.keys()
    assert all(torch.equal(p, expected[n]) for n, p in got.items())
    assert any(h["mode"] == "full" for h in whole.optimizers[0].history)  # AutoMode moved layers: a real test
