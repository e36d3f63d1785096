"""AdaptiveOptimizer: parity with AdamW, transitions, schedulers, resume, AMP, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptopt import AdaptiveOptimizer, Fixed, LayerDecision, Mode, inject_adapters
from adaptopt.training.arguments import adamw_kernel
from tests.helpers import assert_same_snapshot, snapshot
from tests.tiny_models import tiny_bert, token_batch

LABELS = torch.tensor([0, 1])


def train_steps(model, opt, steps, *, seed=0, scheduler=None):
    for i in range(steps):
        tokens = token_batch(seed=seed + i)
        model(input_ids=tokens, labels=LABELS).loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)


KERNELS = [({}, {"fused": True}), ({"foreach": True}, {"foreach": True})]  # ours by default: fused (on CPU)


@pytest.mark.parametrize("ours,theirs", KERNELS)
def test_all_full_is_bit_identical_to_plain_adamw(ours, theirs):
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="full", train_other=True, weight_decay=0.01, **ours)
    assert opt.trainable_parameter_count() == sum(p.numel() for p in reference.parameters())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01, **theirs)
    model.train(), reference.train()
    torch.manual_seed(1)
    train_steps(model, opt, 20)
    torch.manual_seed(1)
    train_steps(reference, ref_opt, 20)
    ours = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    for name, p in reference.named_parameters():
        assert torch.equal(ours[name], p), name


@pytest.mark.parametrize("ours,theirs", KERNELS)
def test_all_lora_equals_hand_built_lora_and_adamw(ours, theirs):
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="lora", rank=4, alpha=8, **ours)
    torch.manual_seed(5)
    adapters = inject_adapters(reference, rank=4, alpha=8)
    for p in reference.parameters():
        p.requires_grad_(False)
    factors = [p for m in adapters.values() for p in (m.lora_A, m.lora_B)]
    head = list(reference.classifier.parameters())
    for p in factors + head:
        p.requires_grad_(True)
    ref_opt = torch.optim.AdamW([{"params": factors, "lr": 1e-2}, {"params": head, "lr": 1e-3}], **theirs)
    train_steps(model, opt, 20)
    train_steps(reference, ref_opt, 20)
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name


def _layer_state(opt, name):
    module = opt.layers[name]
    return {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in module.mode_parameters() if p in opt.state}


LAYERS = [f"bert.encoder.layer.{b}.{t}" for b in range(2) for t in
          ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")]
decisions = st.lists(st.tuples(st.sampled_from(LAYERS), st.sampled_from(list(Mode)), st.integers(1, 6)),
                     min_size=1, max_size=6)


@settings(max_examples=200)
@given(decisions, st.integers(0, 2**16))
def test_transitions_preserve_outputs_and_untouched_adam_state(steps, seed):
    torch.manual_seed(seed)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-2, policy="lora", rank=2, alpha=4, train_other=True,
                            targets=r"(query|value|intermediate\.dense|output\.dense)")
    probe = token_batch(seed=99)
    for i, (name, mode, rank) in enumerate(steps):
        train_steps(model, opt, 1, seed=seed + i)
        others = {n: _layer_state(opt, n) for n in opt.layers if n != name}
        with torch.no_grad():
            before = model(input_ids=probe).logits
        opt.apply({name: LayerDecision(mode, rank)})
        with torch.no_grad():
            after = model(input_ids=probe).logits
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
        for n, state in others.items():
            now = _layer_state(opt, n)
            assert now.keys() == state.keys()
            for k in state:
                assert all(torch.equal(state[k][s], now[k][s]) for s in state[k]), (n, k)
        assert opt.last_check["step"] == opt.step_count  # the check ran (it raises on mismatch)
        assert (opt.layers[name].mode, opt.layers[name].rank) == (mode, rank)


def test_promoted_layer_trains_its_weight_and_demoted_layer_stops():
    torch.manual_seed(0)
    model = tiny_bert()
    name = "bert.encoder.layer.1.attention.self.query"
    opt = AdaptiveOptimizer(model, lr=1e-2, policy="lora", rank=2)
    weight = opt.layers[name].weight
    train_steps(model, opt, 3)
    frozen_copy = weight.detach().clone()
    assert torch.equal(weight, frozen_copy)
    opt.apply({name: Mode.FULL})  # folds the trained s·BA into the weight (same Parameter)
    assert opt.layers[name].weight is weight
    promoted_at = weight.detach().clone()
    train_steps(model, opt, 3, seed=10)
    assert not torch.equal(weight, promoted_at), "a promoted layer must really train (LISA's silent no-op)"
    opt.apply({name: Mode.FROZEN})
    demoted_at = weight.detach().clone()
    assert weight.grad is None and weight not in opt.state
    train_steps(model, opt, 3, seed=20)
    assert torch.equal(weight, demoted_at), "a demoted layer must stop changing"


@pytest.mark.parametrize("kind", ["lambda", "hf_linear", "cosine", "onecycle"])
def test_scheduler_built_once_schedules_layers_promoted_later(kind):
    torch.manual_seed(0)
    model = tiny_bert()
    name = "bert.encoder.layer.0.output.dense"
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="frozen", weight_decay=0.0, eps=1e-12)
    if kind == "lambda":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    elif kind == "hf_linear":
        transformers = pytest.importorskip("transformers")
        scheduler = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=20)
    elif kind == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=30)
    train_steps(model, opt, 5, scheduler=scheduler)
    opt.apply({name: LayerDecision(Mode.FULL, lr_scale=0.5)})
    weight = opt.layers[name].weight
    group = opt.param_groups[opt._group_of_role[("full", name)]]
    scheduled = opt.param_groups[0]["lr"]  # the head's group: same base lr, scheduled from step 0
    assert group["lr"] == pytest.approx(scheduled, rel=1e-12) and scheduled > 0
    before = weight.detach().clone()
    train_steps(model, opt, 1, seed=50, scheduler=scheduler)
    # Adam's first update is lr·sign(g) (bias-corrected m/√v = ±1): the step size is the effective lr
    moved = (weight - before).abs()
    moved = moved[moved > 0]
    assert moved.numel() > 0
    torch.testing.assert_close(moved, torch.full_like(moved, 0.5 * scheduled), rtol=1e-4, atol=0)


@pytest.mark.parametrize("order", ["optimizer_first", "weights_first"])
def test_resume_equals_uninterrupted_run(tmp_path, order):
    """Either order restores the run: the optimizer rebuilds modes before the weights load, or
    the layers take the saved structure from the state dict (what the HF Trainer's resume does)."""
    def build():
        torch.manual_seed(0)
        model = tiny_bert()
        policy = Fixed({r"layer\.1\..*": (Mode.FULL,)}, default=Mode.LORA)
        opt = AdaptiveOptimizer(model, lr=1e-2, policy=policy, rank=2, train_other=True)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)

    def transition(opt):
        opt.apply({"bert.encoder.layer.0.attention.self.key": LayerDecision(Mode.LORA, rank=4),
                   "bert.encoder.layer.1.output.dense": LayerDecision(Mode.LORA, rank=3, lr_scale=0.5),
                   "bert.encoder.layer.0.output.dense": Mode.FULL})

    model, opt, scheduler = build()
    train_steps(model, opt, 4, scheduler=scheduler)
    transition(opt)
    train_steps(model, opt, 3, seed=4, scheduler=scheduler)
    path = tmp_path / "ckpt.pt"
    summary_at_save = opt.summary()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, path)
    train_steps(model, opt, 5, seed=7, scheduler=scheduler)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, opt2, scheduler2 = build()
    saved = torch.load(path, weights_only=True)
    if order == "optimizer_first":
        opt2.load_state_dict(saved["opt"])
        model2.load_state_dict(saved["model"])
    else:
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    torch.set_rng_state(saved["rng"])
    assert opt2.summary() == summary_at_save and opt2.history == opt.history
    train_steps(model2, opt2, 5, seed=7, scheduler=scheduler2)
    for name, p in model2.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert opt2.step_count == opt.step_count


def test_mismatched_checkpoints_are_refused_and_change_nothing():
    torch.manual_seed(0)
    source = AdaptiveOptimizer(tiny_bert(layers=2), lr=1e-3, policy="lora", rank=2)
    train_steps(source.model, source, 2)
    saved = source.state_dict()

    model = tiny_bert(layers=3)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="lora", rank=2)
    before, opt_before = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['bert.encoder.layer.2"):
        opt.load_state_dict(saved)
    assert_same_snapshot(before, snapshot(model))

    same_layers = AdaptiveOptimizer(tiny_bert(layers=2), lr=1e-3, policy="lora", rank=2)
    bad = copy.deepcopy(saved)
    name = next(iter(bad["layers"]))
    bad["state"][f"{name}.lora_A"]["exp_avg"] = torch.zeros(7, 7)
    bad["state"][f"{name}.lora_A"]["exp_avg_sq"] = torch.zeros(7, 7)
    before = snapshot(same_layers.model)
    with pytest.raises(ValueError, match=r"lora_A: checkpoint shape \(7, 7\)"):
        same_layers.load_state_dict(bad)
    assert_same_snapshot(before, snapshot(same_layers.model))
    with pytest.raises(ValueError, match="not an AdaptiveOptimizer checkpoint"):
        same_layers.load_state_dict({"state": {}, "param_groups": []})
    assert opt.state_dict()["layers"] == opt_before["layers"]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"lr": -1.0}, ValueError, "lr must be a finite number"),
    ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
    ({"lora_lr": -1e-3}, ValueError, "lora_lr must be"),
    ({"betas": (0.9, 1.5)}, ValueError, "Invalid beta"),
    ({"eps": -1.0}, ValueError, "Invalid epsilon"),
    ({"rank": 0}, ValueError, "rank must be a positive integer"),
    ({"alpha": -2}, ValueError, "alpha must be"),
    ({"policy": "nonsense"}, ValueError, "unknown policy method 'nonsense'"),
    ({"policy": {"method": "lora", "rnk": 4}}, ValueError, r"unknown option\(s\) \['rnk'\]"),
    ({"policy": 3}, TypeError, "policy must be"),
    ({"nonfinite": "maybe"}, ValueError, "nonfinite must be one of"),
    ({"steps_per_epoch": 0}, ValueError, "steps_per_epoch must be"),
    ({"targets": ["nothing"]}, ValueError, "no target layers matched"),
])
def test_bad_arguments_raise_before_touching_the_model(kwargs, error, message):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        AdaptiveOptimizer(model, **{"lr": 1e-3, **kwargs})
    assert_same_snapshot(before, snapshot(model))


def test_unknown_layer_in_a_decision_changes_nothing():
    opt = AdaptiveOptimizer(tiny_bert(), lr=1e-3)
    before = snapshot(opt.model)
    with pytest.raises(ValueError, match=r"unknown layers \['nope'\]"):
        opt.apply({"bert.encoder.layer.0.attention.self.query": Mode.FULL, "nope": Mode.FULL})
    assert_same_snapshot(before, snapshot(opt.model))


def test_nonfinite_gradients_skip_the_step_or_raise():
    torch.manual_seed(0)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-2, policy="lora", rank=2)
    train_steps(model, opt, 1)
    before = snapshot(model)
    model(input_ids=token_batch(), labels=LABELS).loss.backward()
    next(iter(opt.layers.values())).lora_A.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == 1
    assert_same_snapshot(before, snapshot(model))
    opt.nonfinite = "raise"
    with pytest.raises(FloatingPointError,
                       match=r"non-finite gradients in \['bert.encoder.layer.0.attention.self.query.lora_A'\]"):
        opt.step()
    assert_same_snapshot(before, snapshot(model))


def test_closure_accumulation_clipping_and_zero_grad_variants():
    torch.manual_seed(0)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-2, policy=Fixed({"layer.0": "full"}, default="lora"), rank=2)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = sum(model(input_ids=token_batch(seed=s), labels=LABELS).loss for s in range(2)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert torch.is_tensor(first) and second < first
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for g in opt.param_groups for p in g["params"])


def test_grad_scaler_and_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-2, policy="lora", rank=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for i in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=token_batch(seed=i), labels=LABELS).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.step_count == 3
    assert all(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


def test_summary_table_lists_every_layer_and_totals():
    opt = AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy=Fixed({"layer.1": ("lora", 4)}, default="frozen"))
    text = opt.summary()
    assert "bert.encoder.layer.1.output.dense" in text and "layers: 0 full, 6 lora, 6 frozen" in text
    assert f"{opt.trainable_parameter_count():,}" in text


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # same fresh adapter factors in both
    opt = AdaptiveOptimizer(model, lr=1e-2, policy=Fixed({"layer.0": "full"}, default="lora"), rank=2)
    torch.manual_seed(1)
    ref_opt = AdaptiveOptimizer(reference, lr=1e-2, policy=Fixed({"layer.0": "full"}, default="lora"), rank=2)
    tokens = token_batch(batch=4, seed=3)
    labels = torch.tensor([0, 1, 1, 0])
    for half in (slice(0, 2), slice(2, 4)):  # two micro-batches, losses averaged by hand
        (model(input_ids=tokens[half], labels=labels[half]).loss / 2).backward()
    opt.step()
    reference(input_ids=tokens, labels=labels).loss.backward()
    ref_opt.step()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_decision_touching_a_non_finite_layer_changes_no_layer():
    opt = AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy="lora", rank=2)
    names = list(opt.layers)
    with torch.no_grad():
        opt.layers[names[1]].lora_B.fill_(float("nan"))
    before = snapshot(opt.model)
    with pytest.raises(ValueError, match=f"cannot move to full.*layer '{names[1]}'.*NaN or inf"):
        opt.apply({names[0]: Mode.FULL, names[1]: Mode.FULL})
    assert_same_snapshot(before, snapshot(opt.model))
    assert opt.layers[names[0]].mode is Mode.LORA


def test_the_adamw_kernel_is_fused_where_torch_has_it_unless_the_user_chose():
    cpu, meta = [torch.zeros(2)], [torch.zeros(2, device="meta")]
    assert adamw_kernel(cpu, {"betas": (0.9, 0.99)}) == {"betas": (0.9, 0.99), "fused": True}
    assert adamw_kernel(meta, {}) == {"foreach": True}  # no fused kernel for that device
    assert adamw_kernel(cpu, {"foreach": False}) == {"foreach": False}
    assert adamw_kernel(cpu, {"fused": False}) == {"fused": False, "foreach": True}
    assert adamw_kernel(cpu, {"fused": None, "foreach": None}) == {"fused": True, "foreach": None}
    opt = AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy="full")
    assert all(g["fused"] for g in opt.param_groups) and opt.inner.defaults["fused"]
    opt.apply({name: Mode.LORA for name in opt.layers})  # groups the optimizer fills later keep the kernel
    assert all(g["fused"] for g in opt.param_groups)


def test_layer_lr_scales_apply_during_the_update_only_even_when_it_raises():
    """Each layer's groups run at lr × its scale inside ``scaled_lrs`` (the "other" group unscaled);
    the scheduled lrs come back after it, also when the update raises."""
    from adaptopt.training.param_groups import layer_groups, scaled_lrs
    roles, groups = layer_groups(["a", "b"], lr=1e-3, lora_lr=1e-2, lora_plus_ratio=4.0)
    assert roles == [("other", None), ("full", "a"), ("lora", "a"), ("lora_b", "a"),
                     ("full", "b"), ("lora", "b"), ("lora_b", "b")]
    before = [g["lr"] for g in groups]
    assert before == [1e-3, 1e-3, 1e-2, 4e-2, 1e-3, 1e-2, 4e-2]
    scales = {"a": 0.5, "b": 1.0}
    with scaled_lrs(groups, roles, scales):
        assert [g["lr"] for g in groups] == [lr * (scales[r[1]] if r[1] else 1.0) for lr, r in zip(before, roles)]
    assert [g["lr"] for g in groups] == before
    with pytest.raises(RuntimeError), scaled_lrs(groups, roles, scales):
        raise RuntimeError("the update failed")
    assert [g["lr"] for g in groups] == before
