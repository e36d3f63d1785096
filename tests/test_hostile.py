"""A hostile user's cases (nothing silently wrong, nothing half-changed): one test per case
family; the crash (kill -9) cases are in test_crash_safety.py, the CLI's in test_cli_errors.py."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from adaptopt import (
    AdaptiveOptimizer,
    Fixed,
    LayerDecision,
    LoRALinear,
    Mode,
    inject_adapters,
    load_adapters,
    save_adapters,
)
from adaptopt.formats.checkpoint import CONFIG_FILE, adapters_file
from tests.helpers import assert_same_snapshot, randomize_adapter, simulate_training, snapshot
from tests.tiny_models import tiny_bert, tiny_llama, token_batch

LABELS = torch.tensor([0, 1])


def steps(model, opt, batches, nan_at=None, scaler_skip_at=None):
    """Train on ``batches``; at ``nan_at`` the loss is NaN (the optimizer skips the step); at
    ``scaler_skip_at`` the gradients are inf and ``step`` is never called, as a GradScaler does."""
    model.train()
    for i, tokens in enumerate(batches):
        loss = model(input_ids=tokens, labels=LABELS).loss
        if i in (nan_at, scaler_skip_at):
            loss = loss * float("nan" if i == nan_at else "inf")
        loss.backward()
        if i != scaler_skip_at:
            opt.step()
        opt.zero_grad()


# ------------------------------------------------------------------ 3. load into an eval-mode model
def test_load_adapters_into_an_eval_model_gives_eval_adapters(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    layers = inject_adapters(model, rank=4, alpha=8, dropout=0.1)
    for layer in layers.values():
        randomize_adapter(layer)
    model.eval()
    save_adapters(model, tmp_path)
    with torch.no_grad():
        expected = model(input_ids=token_batch()).logits
    torch.manual_seed(0)
    fresh = tiny_bert()  # eval mode, as from_pretrained returns it
    loaded = load_adapters(fresh, tmp_path)
    assert not any(m.training for m in loaded.values())
    with torch.no_grad():
        first, second = fresh(input_ids=token_batch()).logits, fresh(input_ids=token_batch()).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected)


# ------------------------------------------------------------------ 4. tied lm_head
def test_a_tied_lm_head_is_refused_with_the_tie_named_and_nothing_changed():
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with 'model.embed_tokens.weight'.*untie"):
        AdaptiveOptimizer(model, policy="lora", targets=["lm_head", "q_proj"])
    assert_same_snapshot(before, snapshot(model))
    inject_adapters(model, targets=["q_proj"])  # untied targets still work on the same model


# ------------------------------------------------------------------ 5. a skipped step leaves no trace
@pytest.mark.parametrize("how", ["nonfinite_skip", "grad_scaler_skip"])
def test_a_skipped_nonfinite_step_leaves_no_trace(how):
    batches = [token_batch(seed=i) for i in range(9)]

    def run(skip):
        torch.manual_seed(0)
        model = tiny_bert(dropout=0.0)
        opt = AdaptiveOptimizer(model, lr=1e-2, policy={"method": "automode", "u": 2, "t": 50, "score_steps": 3},
                                rank=2, steps_per_epoch=4)
        if skip:
            poisoned = batches[:2] + [batches[2]] + batches[2:]  # an extra batch that is skipped
            steps(model, opt, poisoned, **{("nan_at" if how == "nonfinite_skip" else "scaler_skip_at"): 2})
        else:
            steps(model, opt, batches)
        return model, opt

    clean_model, clean = run(False)
    model, opt = run(True)
    assert opt.step_count == clean.step_count == 9
    assert [(h["step"], h["layer"], h["mode"]) for h in opt.history] == \
        [(h["step"], h["layer"], h["mode"]) for h in clean.history]
    assert any(h["reason"] == "decision" for h in opt.history)
    decided = [e for e in opt.score_log if e["step"] > 0]
    assert decided and all(math.isfinite(v["grad_norm"]) for e in decided for v in e["scores"].values())
    for (name, p), q in zip(model.named_parameters(), clean_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ 6 and 7. optimizer state validated first
def _trained():
    torch.manual_seed(0)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Fixed({r"layer\.0": "full"}, default=("lora", 2)), rank=2)
    steps(model, opt, [token_batch(seed=i) for i in range(2)])
    return opt


def _corrupt(sd, case):
    lora = next(k for k in sd["state"] if k.endswith("lora_A"))
    if case == "nan_exp_avg":
        sd["state"][lora]["exp_avg"][0, 0] = float("nan")
    elif case == "inf_exp_avg_sq":
        sd["state"][lora]["exp_avg_sq"][0, 0] = float("inf")
    elif case == "negative_exp_avg_sq":
        sd["state"][lora]["exp_avg_sq"][0, 0] = -1.0
    elif case == "nan_step":
        sd["state"][lora]["step"] = torch.tensor(float("nan"))
    elif case == "nan_lr_scale":
        sd["layers"][next(iter(sd["layers"]))]["lr_scale"] = float("nan")
    elif case == "inf_lr_scale":
        sd["layers"][next(iter(sd["layers"]))]["lr_scale"] = float("inf")
    elif case == "moment_shape":
        sd["state"][lora]["exp_avg_sq"] = torch.zeros(3, 3)
    elif case == "missing_moment":
        del sd["state"][lora]["exp_avg_sq"]
    elif case == "groups_cut_short":
        sd["groups"] = sd["groups"][:-1]
    elif case == "group_lr_nan":
        sd["groups"][0]["lr"] = float("nan")
    elif case.startswith("missing_"):
        del sd[case.removeprefix("missing_")]
    elif case == "step_abc":
        sd["step"] = "abc"
    elif case == "bad_mode":
        sd["layers"][next(iter(sd["layers"]))]["mode"] = "sideways"
    return sd


BAD_STATE = {"nan_exp_avg": "exp_avg: holds NaN", "inf_exp_avg_sq": "exp_avg_sq: holds NaN or inf",
             "negative_exp_avg_sq": "negative values", "nan_step": r"\.step: expected a finite number",
             "nan_lr_scale": "lr_scale: expected a finite", "inf_lr_scale": "lr_scale: expected a finite",
             "moment_shape": r"exp_avg_sq: checkpoint shape \(3, 3\)", "missing_moment": "exp_avg_sq: missing",
             "groups_cut_short": "groups: 24 in the checkpoint, 25", "group_lr_nan": r"groups\[0\]\.lr",
             "missing_history": r"lacks \['history'\]", "missing_groups": r"lacks \['groups'\]",
             "missing_step": r"lacks \['step'\]", "missing_scores": r"lacks \['scores'\]",
             "step_abc": "step: expected an int", "bad_mode": "unknown mode 'sideways'"}


@pytest.mark.parametrize("case", sorted(BAD_STATE))
def test_a_malformed_optimizer_state_is_refused_before_anything_changes(case):
    saved = _corrupt(copy.deepcopy(_trained().state_dict()), case)
    torch.manual_seed(1)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=Fixed({r"layer\.0": "full"}, default=("lora", 2)), rank=2)
    before, opt_before = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=BAD_STATE[case]) as info:
        opt.load_state_dict(saved)
    assert "nothing was loaded" in str(info.value)
    assert_same_snapshot(before, snapshot(model))
    after = opt.state_dict()
    assert after["step"] == opt_before["step"] and after["layers"] == opt_before["layers"]
    assert {k: v["exp_avg"].tolist() for k, v in after["state"].items()} == \
        {k: v["exp_avg"].tolist() for k, v in opt_before["state"].items()}


# ------------------------------------------------------------------ 8. failed constructors change nothing
class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_a_failed_constructor_leaves_the_model_exactly_as_it_was():
    model = NoBlocks()
    before = snapshot(model)
    with pytest.raises(ValueError):
        AdaptiveOptimizer(model, policy="topk")
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        AdaptiveOptimizer(model, policy=Fixed({".*": ("lora", "four")}))
    assert_same_snapshot(before, snapshot(model))


def test_a_failed_constructor_on_existing_adapters_puts_them_back():
    torch.manual_seed(0)
    model = tiny_bert()
    layers = inject_adapters(model, rank=4, alpha=8)
    for layer in layers.values():
        randomize_adapter(layer)
    before = snapshot(model)
    first = next(iter(layers))
    with torch.no_grad():
        layers[first].lora_B.fill_(float("nan"))  # the initial FULL move of this layer is refused
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        AdaptiveOptimizer(model, policy=Fixed({r"layer\.1": "frozen", ".*": "full"}))
    assert_same_snapshot(before, snapshot(model))


# ------------------------------------------------------------------ 9. re-wrapping, other policies
def test_rewrapping_with_another_rank_or_alpha_warns_naming_both():
    torch.manual_seed(0)
    model = tiny_bert()
    inject_adapters(model, rank=4, alpha=8)
    with pytest.warns(UserWarning, match=r"rank=16 requested, the adapters have rank \[4\].*alpha=32 requested"):
        AdaptiveOptimizer(model, policy="lora", rank=16, alpha=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaptiveOptimizer(model, policy="lora", rank=4)  # what they have: no warning


def test_a_checkpoint_from_another_policy_loads_with_a_warning():
    saved = _trained().state_dict()
    torch.manual_seed(1)
    opt = AdaptiveOptimizer(tiny_bert(), lr=1e-3, policy="lora", rank=2)
    with pytest.warns(UserWarning, match=r"written with policy \{'method': 'fixed'.*runs \{'method': 'lora'"):
        opt.load_state_dict(saved)


# ------------------------------------------------------------------ 12. clear errors for bad values
@pytest.mark.parametrize("build, message", [
    (lambda m: AdaptiveOptimizer(m, lr="1e-3"), "lr must be a finite number"),
    (lambda m: AdaptiveOptimizer(m, lora_lr="1e-3"), "lora_lr must be a finite number"),
    (lambda m: AdaptiveOptimizer(m, dropout="0.1"), r"dropout must be in \[0, 1\)"),
    (lambda m: AdaptiveOptimizer(m, targets=r"query(["), "invalid name pattern"),
    (lambda m: AdaptiveOptimizer(m, steps_per_epoch=True), "steps_per_epoch must be a positive int"),
    (lambda m: AdaptiveOptimizer(m, targets=["query", "nonexistent"]), r"targets \['nonexistent'\] match no"),
])
def test_bad_arguments_get_a_clear_error_and_change_nothing(build, message):
    torch.manual_seed(0)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        build(model)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("damage, message", [
    ("invalid_json", "is not valid JSON"), ("empty_json", "is empty"), ("latin1_json", "is not UTF-8"),
    ("no_in_features", r"lack \['.*in_features"), ("corrupt_tensors", "does not match the checksum"),
    ("truncated_header", "not a readable safetensors file"),
])
def test_damaged_adapter_folders_get_an_error_naming_the_file(tmp_path, damage, message):
    torch.manual_seed(0)
    model = tiny_bert()
    for layer in inject_adapters(model, rank=2).values():
        randomize_adapter(layer)
    save_adapters(model, tmp_path)
    config_path, tensors = tmp_path / CONFIG_FILE, adapters_file(tmp_path)
    if damage == "invalid_json":
        config_path.write_text("{not json")
    elif damage == "empty_json":
        config_path.write_text("")
    elif damage == "latin1_json":
        config_path.write_bytes("{\"format\": \"é\"}".encode("latin-1"))
    elif damage == "no_in_features":
        config = json.loads(config_path.read_text())
        del next(iter(config["layers"].values()))["in_features"]
        config_path.write_text(json.dumps(config))
    elif damage == "corrupt_tensors":
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0xFF
        tensors.write_bytes(bytes(data))
    else:
        config = json.loads(config_path.read_text())
        tensors.write_bytes(tensors.read_bytes()[:20])
        del config["tensors"]["sha256"]
        config_path.write_text(json.dumps(config))
    torch.manual_seed(0)
    fresh = tiny_bert()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message) as info:
        load_adapters(fresh, tmp_path)
    assert str(tmp_path) in str(info.value)
    assert_same_snapshot(before, snapshot(fresh))


# ------------------------------------------------------------------ 13. accepted but wrong
def test_layer_decisions_refuse_bad_ranks_and_scales():
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="rank must be a positive int"):
            LayerDecision("lora", bad)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="lr_scale must be a finite number"):
            LayerDecision("lora", 4, bad)


@pytest.mark.parametrize("policy, build", [("bitfit", lambda: NoBiasNet()), ("frozen", lambda: tiny_llama())])
def test_a_policy_that_trains_nothing_says_so(policy, build):
    with pytest.warns(UserWarning, match="trains no parameter"):
        AdaptiveOptimizer(build(), policy=policy)


class NoBiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ------------------------------------------------------------------ 14. lossy 4-bit moves, with their bound
@pytest.mark.parametrize("move", ["full_to_frozen", "full_to_lora", "rank_cut"])
def test_lossy_4bit_moves_lose_exactly_the_discarded_singular_values(move):
    pytest.importorskip("bitsandbytes")
    from adaptopt import QuantLoRALinear
    from adaptopt.layers.quant import dequantize
    torch.manual_seed(0)
    layer = QuantLoRALinear(nn.Linear(64, 48), rank=4, alpha=8, mode=Mode.FULL if move != "rank_cut" else Mode.LORA)
    randomize_adapter(layer)
    simulate_training(layer)
    base = dequantize(layer.base).float()
    before = layer.effective_weight() - base
    singular = torch.linalg.svdvals(before.double())
    rank = 2 if move == "rank_cut" else 4
    target = {"full_to_frozen": Mode.FROZEN, "full_to_lora": Mode.LORA, "rank_cut": Mode.LORA}[move]
    x = torch.randn(16, 64)
    with torch.no_grad():
        out_before = layer(x)
    layer.set_mode(target, rank)
    after = layer.effective_weight() - base
    error = torch.linalg.matrix_norm((before - after).double())
    bound = singular[rank:].square().sum().sqrt()
    assert singular[rank:].sum() > 0.1 * singular.sum()  # the move really is lossy here
    torch.testing.assert_close(error, bound, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the output moves by at most ‖U − U'‖₂ · ‖x‖ per row
        moved = (layer(x) - out_before).norm(dim=-1)
    assert bool((moved <= torch.linalg.matrix_norm((before - after), ord=2) * x.norm(dim=-1) * (1 + 1e-4) + 1e-5).all())


# ------------------------------------------------------------------ 15. micro-batches: the documented score
def test_the_gradient_score_is_the_rms_over_micro_batches():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=2)
    model = nn.Sequential(layer)
    layer.target = None
    from adaptopt.training.layer_stats import StatsCollector
    collector = StatsCollector({"l": layer})
    collector.arm()
    xs, grads = [torch.randn(3, 6) for _ in range(2)], [torch.randn(3, 5) for _ in range(2)]
    for x, g in zip(xs, grads):
        model(x).backward(g)
    collector.commit()
    expected = math.sqrt(sum(float((g.T @ x).square().sum()) for x, g in zip(xs, grads)) / 2)
    assert collector.scores()["l"]["grad_norm"] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ 16. "full" means every parameter
def test_full_policy_trains_what_plain_adamw_trains():
    torch.manual_seed(0)
    model = tiny_bert()
    opt = AdaptiveOptimizer(model, policy="full")
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.is_floating_point()}
    frozen = AdaptiveOptimizer(tiny_bert(), policy="full", frozen=["embeddings"])
    assert not any(p.requires_grad for n, p in frozen.model.named_parameters() if "embeddings" in n)
