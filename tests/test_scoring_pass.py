"""The scoring pass before training (adaptopt/training/scoring_pass.py): the default decides at step 0
from one batch, changes nothing else, and then trains exactly what its static twin trains."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from adaptopt import AdaptiveOptimizer, Hybrid, Mode, Scheduled
from adaptopt.training.arguments import TASK_HEADS
from tests.tiny_models import VOCAB, tiny_bert, tiny_llama, token_batch, transformers

STEPS = 6


def model_and_batches(kind: str, seed: int):
    torch.manual_seed(seed)
    model = tiny_llama(6) if kind == "llama" else tiny_bert(6, dropout=0.0)
    batches = []
    for i in range(STEPS):
        ids = token_batch(4, 9, seed=100 * seed + i)
        labels = ids if kind == "llama" else (ids[:, 1] > VOCAB // 2).long()
        batches.append({"input_ids": ids, "labels": labels})
    return model.train(), batches


def train(model, opt, batches):
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def factors(opt):
    return {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
            for name, m in opt.layers.items() if m.lora_A is not None}


def set_factors(opt, start):
    with torch.no_grad():
        for name, (a, b) in start.items():
            opt.layers[name].lora_A.copy_(a)
            opt.layers[name].lora_B.copy_(b)


def twin_of(model, opt, start_factors):
    """The static twin of ``opt``'s run on a copy of the untouched ``model``: the modes after the
    pass from step 0, the late freezes at their steps, the same starting factors."""
    plan = {0: {name: m.mode for name, m in opt.layers.items() if name != opt.output_adapter}}
    for h in opt.history:
        if h["step"] > 0:
            plan.setdefault(h["step"], {})[h["layer"]] = h["mode"]
            plan[0][h["layer"]] = h["from_mode"]
    twin = AdaptiveOptimizer(model, lr=1e-2, lora_lr=2e-2, rank=2, policy=Scheduled(plan),
                             train_embeddings="output_lora" if opt.output_adapter else None,
                             trainable=[*TASK_HEADS, *Hybrid().trainable_extra()])
    set_factors(twin, start_factors)
    return twin


@pytest.mark.parametrize("kind,seed", [("llama", 0), ("llama", 1), ("bert", 0), ("bert", 1)])
def test_with_the_pass_the_default_trains_exactly_as_its_static_twin(kind, seed):
    model, batches = model_and_batches(kind, seed)
    untouched = copy.deepcopy(model)
    opt = AdaptiveOptimizer(model, lr=1e-2, lora_lr=2e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    assert opt.score_before_training(lambda: model(**batches[0]).loss.backward())
    assert {h["step"] for h in opt.history if h["reason"] == "decision"} == {0}
    assert any(m.mode is Mode.FULL for m in opt.layers.values())
    start = factors(opt)
    train(model, opt, batches)

    twin_model = copy.deepcopy(untouched)
    twin = twin_of(twin_model, opt, start)
    train(twin_model, twin, batches)
    ours, theirs = dict(model.named_parameters()), dict(twin_model.named_parameters())
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)

    # the comparison can fail: deciding after the first update (no pass) trains something else
    late_model = copy.deepcopy(untouched)
    late = AdaptiveOptimizer(late_model, lr=1e-2, lora_lr=2e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    train(late_model, late, batches)
    assert {h["step"] for h in late.history if h["reason"] == "decision"} >= {1}
    assert any(not torch.equal(p, theirs[n]) for n, p in late_model.named_parameters() if n in theirs)


def test_the_pass_changes_no_weight_no_gradient_and_no_random_state():
    _, batches = model_and_batches("bert", 0)
    model = tiny_bert(3, dropout=0.1).train()  # dropout draws from the generator during the pass
    opt = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    model.eval()
    before = model(input_ids=batches[1]["input_ids"]).logits
    model.train()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert opt.score_before_training(lambda: model(**batches[0]).loss.backward())
    assert torch.equal(torch.rand(3), expected)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(input_ids=batches[1]["input_ids"]).logits, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_the_pass_decides_what_a_first_step_at_zero_lr_would(kind):
    """Parity computed another way: the Trainer's linear warmup makes the first update's LR 0, so
    deciding after that step (no pass) reads the same gradients at the same weights."""
    model, batches = model_and_batches(kind, 3)
    other = copy.deepcopy(model)
    with_pass = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    torch.manual_seed(0)
    for m in (with_pass.layers[n] for n in factors(with_pass)):
        torch.nn.init.normal_(m.lora_B)  # factors that carry gradient to A too
    start = factors(with_pass)
    with_pass.score_before_training(lambda: model(**batches[0]).loss.backward())
    without = AdaptiveOptimizer(other, lr=0.0, lora_lr=0.0, rank=2, policy=Hybrid(), total_steps=STEPS)
    set_factors(without, start)
    other(**batches[0]).loss.backward()
    without.step()
    assert {n: m.mode for n, m in with_pass.layers.items()} == {n: m.mode for n, m in without.layers.items()}
    for name, values in with_pass.scores.items():
        assert values["grad_norm"] == pytest.approx(without.scores[name]["grad_norm"], rel=1e-5), name


def test_a_pass_that_cannot_run_says_why_and_changes_nothing():
    model, batches = model_and_batches("llama", 0)
    lora = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy="lora")
    with pytest.raises(ValueError, match="does not decide from one batch"):
        lora.score_before_training(lambda: pytest.fail("the closure must not run"))

    model, batches = model_and_batches("llama", 0)
    opt = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    model(**batches[0]).loss.backward()
    with pytest.raises(ValueError, match="already hold gradients.*zero_grad"):
        opt.score_before_training(lambda: pytest.fail("the closure must not run"))
    opt.step()
    opt.zero_grad()
    modes = {n: m.mode for n, m in opt.layers.items()}
    with pytest.raises(ValueError, match="already taken 1 step"):
        opt.score_before_training(lambda: pytest.fail("the closure must not run"))
    assert {n: m.mode for n, m in opt.layers.items()} == modes

    model, batches = model_and_batches("llama", 0)
    opt = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy=Hybrid(calibration_steps=3), total_steps=STEPS)
    with pytest.raises(ValueError, match="only Hybrid\\(calibration_steps=1\\)"):
        opt.score_before_training(lambda: None)


def test_a_failed_or_non_finite_pass_leaves_the_decision_to_the_first_step():
    model, batches = model_and_batches("llama", 0)
    opt = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)

    def boom():
        model(**batches[0]).loss.backward()
        raise RuntimeError("out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.score_before_training(boom)
    assert all(p.grad is None for p in model.parameters())
    with pytest.warns(UserWarning, match="non-finite"):
        assert not opt.score_before_training(lambda: (model(**batches[0]).loss * float("nan")).backward())
    assert not opt.policy.scored_before_training and all(m.mode is Mode.LORA for m in opt.layers.values())
    train(model, opt, batches[:1])
    decided = {h["step"] for h in opt.history if h["reason"] == "decision"}
    assert decided == {1}
    # the scores the decision read are the first step's alone: the failed passes left none behind
    fresh_model, _ = model_and_batches("llama", 0)
    fresh = AdaptiveOptimizer(fresh_model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    train(fresh_model, fresh, batches[:1])
    assert fresh.history == opt.history
    assert fresh.scores == opt.scores


def test_a_resumed_run_keeps_the_decision_of_its_pass(tmp_path):
    model, batches = model_and_batches("llama", 0)
    opt = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    opt.score_before_training(lambda: model(**batches[0]).loss.backward())
    train(model, opt, batches[:2])
    state = opt.state_dict()
    assert state["scored_before_training"] is True
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    resumed_model, _ = model_and_batches("llama", 0)
    resumed = AdaptiveOptimizer(resumed_model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    resumed.load_state_dict(state)
    resumed_model.load_state_dict(weights)
    with pytest.raises(ValueError, match="already ran"):
        resumed.score_before_training(lambda: None)
    train(resumed_model, resumed, batches[2:])
    train(model, opt, batches[2:])
    assert resumed.history == opt.history  # no second "first" decision after the resume
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    bad = {**state, "scored_before_training": "yes"}
    with pytest.raises(ValueError, match="scored_before_training: expected true or false"):
        resumed.load_state_dict(bad)


def test_the_trainer_runs_the_pass_on_its_first_batch_without_moving_the_data_order(tmp_path):
    pytest.importorskip("accelerate")
    from adaptopt.integrations.hf import AdaptoptCallback

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.tokens = token_batch(24, 9, seed=5)

        def __len__(self):
            return len(self.tokens)

        def __getitem__(self, i):
            return {"input_ids": self.tokens[i], "labels": (self.tokens[i, 1] > VOCAB // 2).long()}

    def run(policy):
        torch.manual_seed(0)
        model = tiny_bert(3, dropout=0.1)
        seen = []
        model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / policy), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
            warmup_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        opt = AdaptiveOptimizer(model, lr=1e-3, rank=2, policy=policy)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, None),
                                       callbacks=[AdaptoptCallback()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        return opt, seen, trainer.state.log_history

    hybrid, with_pass, logs = run("hybrid")
    lora, plain, _ = run("lora")
    assert hybrid.policy.scored_before_training
    assert {h["step"] for h in hybrid.history if h["mode"] == "full"} == {0}
    assert any(r.get("adaptopt/transitions") for r in logs if r["step"] == 1)  # the step-0 decision is logged
    assert len(with_pass) == len(plain) + 1  # the pass's forward, then the training order
    assert torch.equal(with_pass[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(with_pass[1:], plain))


def test_the_callbacks_pass_skips_a_batch_without_a_loss():
    pytest.importorskip("accelerate")
    from adaptopt.integrations.hf import score_first_batch
    model, batches = model_and_batches("llama", 0)
    opt = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy=Hybrid(), total_steps=STEPS)
    assert not score_first_batch(opt, model, [{"input_ids": batches[0]["input_ids"]}])  # no labels: no loss
    assert not opt.policy.scored_before_training and all(p.grad is None for p in model.parameters())
    assert score_first_batch(opt, model, [batches[0]])
    assert {h["step"] for h in opt.history if h["mode"] == "full"} == {0}
