"""LISA and BAdam on the optimizer's FROZEN ↔ FULL moves: the sampled blocks train fully for exactly
their period, every other block is frozen, Adam state exists only for what trains (dropped on
leaving), a resume mid-period is bit-identical, and importance sampling follows its weights."""
from __future__ import annotations

import math

import pytest
import torch

from adaptopt import LISA, AdaptiveOptimizer, BAdam, Mode
from adaptopt.policies.base import LayerView
from tests.tiny_models import tiny_bert, tiny_llama, token_batch


def run(policy, steps, model=None, opt=None, start=0, record=None):
    if model is None:
        torch.manual_seed(0)
        model = tiny_llama(layers=4).train()
        opt = AdaptiveOptimizer(model, lr=1e-3, policy=policy, rank=2)
    for i in range(start, start + steps):
        if record is not None:
            record.append(active_blocks(opt))
            check_state(opt)
        tokens = token_batch(seed=i)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def active_blocks(opt) -> frozenset:
    blocks = {}
    for m in opt.layers.values():
        blocks.setdefault(m.block_index, set()).add(m.mode)
    assert all(len(modes) == 1 and modes <= {Mode.FULL, Mode.FROZEN} for modes in blocks.values()), blocks
    return frozenset(b for b, modes in blocks.items() if Mode.FULL in modes)


def check_state(opt):
    """Adam state (and gradients) only for what trains: the active blocks, embeddings and head."""
    names = {p: n for n, p in opt.model.named_parameters()}
    active = {f"model.layers.{b}." for b in active_blocks(opt)}
    for p in opt.state:
        name = names[p]
        assert p.requires_grad and (any(name.startswith(a) for a in active) or "embed" in name
                                    or "lm_head" in name), name
    for name, p in opt.model.named_parameters():
        if name.startswith("model.layers.") and not any(name.startswith(a) for a in active):
            assert not p.requires_grad and p.grad is None and p not in opt.state, name


@pytest.mark.parametrize("gamma, period", [(1, 3), (2, 2)])
def test_lisa_trains_its_sampled_blocks_for_exactly_a_period_and_freezes_the_rest(gamma, period):
    record: list = []
    _, opt = run(LISA(gamma=gamma, period=period), 4 * period, record=record)
    periods = [record[i:i + period] for i in range(0, len(record), period)]
    assert all(len(set(p)) == 1 and len(p[0]) == gamma for p in periods), record  # constant within a period
    assert len({p[0] for p in periods}) > 1  # and redrawn between periods
    embeddings = opt.model.get_input_embeddings().weight
    assert embeddings.requires_grad and embeddings in opt.state  # LISA trains the embeddings throughout


def test_badam_visits_one_block_at_a_time_in_its_order():
    record: list = []
    run(BAdam(period=2), 10, record=record)
    assert record == [frozenset({b}) for b in (3, 3, 2, 2, 1, 1, 0, 0, 3, 3)]
    record = []
    run(BAdam(period=1, order="random", seed=3), 8, record=record)
    assert sorted(min(r) for r in record[:4]) == [0, 1, 2, 3] == sorted(min(r) for r in record[4:])  # a pass each
    record = []
    _, opt = run(BAdam(period=1, order="ascending"), 2, record=record)
    assert record == [frozenset({0}), frozenset({1})]
    assert not opt.model.get_input_embeddings().weight.requires_grad  # BAdam: embeddings frozen


@pytest.mark.parametrize("policy", [LISA(gamma=1, period=3, weighted=True, score_steps=2), BAdam(period=3)],
                         ids=["lisa-weighted", "badam"])
def test_a_resume_mid_period_is_bit_identical(policy):
    whole_model, whole_opt = run(policy, 10)
    model, opt = run(type(policy)(**{k: v for k, v in policy.config().items() if k != "method"}), 4)
    model_state, opt_state = model.state_dict(), opt.state_dict()
    torch.manual_seed(0)
    fresh = tiny_llama(layers=4).train()
    again = AdaptiveOptimizer(fresh, lr=1e-3, policy=type(policy)(**{k: v for k, v in policy.config().items()
                                                                      if k != "method"}), rank=2)
    again.load_state_dict(opt_state)
    fresh.load_state_dict(model_state)
    run(None, 6, model=fresh, opt=again, start=4)
    assert again.history == whole_opt.history
    for name, p in fresh.named_parameters():
        assert torch.equal(p, dict(whole_model.named_parameters())[name]), name


def test_importance_sampling_follows_its_weights():
    """Over 4,000 seeded draws of one block, each block's frequency is within 4σ of its probability
    w_b / Σw (a binomial count: σ = √(n p (1 − p)))."""
    policy = LISA(gamma=1, weighted=True)
    views = {f"model.layers.{b}.q": LayerView(f"model.layers.{b}.q", f"model.layers.{b}", b, "q", Mode.FROZEN, 2, 1.0,
                                              8, 8, False) for b in range(4)}
    weights = [1.0, 2.0, 3.0, 4.0]
    scores = {f"model.layers.{b}.q": {"grad_norm": w} for b, w in enumerate(weights)}
    groups = policy.blocks(views)
    n = 4000
    counts = dict.fromkeys(groups, 0)
    for index in range(1, n + 1):
        counts[policy.choose(groups, scores, index, 1)[0]] += 1
    for (unit, count), w in zip(counts.items(), weights):
        p = w / sum(weights)
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (unit, count, n * p)
    two = LISA(gamma=2, weighted=True)
    assert all(len(set(two.choose(groups, scores, i, 2))) == 2 for i in range(1, 50))  # without replacement


@pytest.mark.parametrize("build, message", [
    (lambda: LISA(gamma=0), "gamma must be a positive int"),
    (lambda: LISA(period=2.5), "period must be a positive int"),
    (lambda: LISA(weighted="yes"), "weighted and train_embeddings are true or false"),
    (lambda: BAdam(order="sideways"), r"order must be one of \('descending', 'ascending', 'random'\)"),
])
def test_bad_settings_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("policy", ["lora", "hybrid", "lisa", "badam", "full"])
def test_whether_embeddings_train_is_a_setting_of_every_policy(policy):
    """``train_embeddings=True`` trains the input embeddings and the output layer under any policy,
    ``False`` freezes them under any (Full and LISA included), ``None`` leaves it to the policy."""
    trains = {}
    for setting in (None, True, False):
        model = tiny_llama(layers=2)
        AdaptiveOptimizer(model, lr=1e-3, policy=policy, rank=2, train_embeddings=setting)
        trains[setting] = model.model.embed_tokens.weight.requires_grad
    assert trains[True] and not trains[False]
    assert trains[None] == (policy in ("lisa", "full"))
    with pytest.raises(ValueError, match="train_embeddings is True, False, 'output'"):
        AdaptiveOptimizer(tiny_llama(layers=2), lr=1e-3, policy=policy, train_embeddings="yes")


def trained_names(model, **kwargs):
    AdaptiveOptimizer(model, lr=1e-3, rank=2, **kwargs)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_output_layer_alone_trains_where_a_model_has_one():
    """``train_embeddings="output"``: a language model's head, shared with the input embeddings when
    tied; a classifier (no output embeddings) trains exactly what it trains without the setting."""
    untied = trained_names(tiny_llama(layers=2), policy="lora", train_embeddings="output")
    assert untied - trained_names(tiny_llama(layers=2), policy="lora") == {"lm_head.weight"}
    config = tiny_llama(layers=2).config
    config.tie_word_embeddings = True
    tied = type(tiny_llama(layers=2))(config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert trained_names(tied, policy="hybrid", train_embeddings="output") - trained_names(
        tiny_llama(layers=2), policy="hybrid") == {"model.embed_tokens.weight"}
    assert tied.lm_head.weight.requires_grad
    assert trained_names(tiny_bert(), policy="lora", train_embeddings="output") == trained_names(
        tiny_bert(), policy="lora")
