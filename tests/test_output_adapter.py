"""What the default trains besides the layers its policy decides: the output adapter
(adaptopt/surgery/output_adapter.py) — a LoRA adapter on a language model's head that trains all
run, is never decided by the policy, and, on a tied head, never touches the input embeddings, in
training, in saved folders, in merged and PEFT exports — and a classifier's head inputs (the pooler)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptopt import (
    AdaptiveOptimizer,
    Mode,
    export_merged,
    export_peft,
    inject_adapters,
    load_adapters,
    save_adapters,
)
from adaptopt.formats.export import merged_state_dict
from adaptopt.formats.hf_folders import SIDECAR, save_plainly
from tests.tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, token_batch, transformers

HYBRID = {"method": "hybrid", "calibration_steps": 1, "t": 50, "freeze_prefix": 0}


def tied_llama(layers: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {"tied llama": tied_llama, "gpt2 (tied)": tiny_gpt2, "untied llama": tiny_llama}


def train(model, opt, x, steps):
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def embedding(model) -> torch.Tensor:
    return model.get_input_embeddings().weight


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_the_default_adapts_the_head_on_its_own_weight_and_the_policy_never_moves_it(kind):
    torch.manual_seed(0)
    model = MODELS[kind]()
    tied = model.get_output_embeddings().weight is embedding(model)
    x = token_batch(2, 7)
    with torch.no_grad():
        before = model(x).logits.clone()
    embeddings = embedding(model).detach().clone()
    opt = AdaptiveOptimizer(model, lr=1e-2, policy=HYBRID, rank=2, alpha=6.0, total_steps=6)
    assert opt.output_adapter == "lm_head" and "lm_head" not in opt.views()
    head = model.lm_head
    assert head.mode is Mode.LORA and head.base.weight is not embedding(model)
    assert head.weight_source == ("transformer.wte.weight" if kind.startswith("gpt2") else
                                  "model.embed_tokens.weight" if tied else None)
    assert model.config.tie_word_embeddings is False or not tied
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)  # the copy and B = 0: the same function
    train(model, opt, x, 6)
    assert any(m.mode is Mode.FULL for m in opt.layers.values())  # the policy decided the blocks ...
    assert head.mode is Mode.LORA and head.rank == 2 and float(head.lora_B.detach().abs().sum()) > 0  # ... not the head
    assert not [h for h in opt.history if h["layer"] == "lm_head"]  # no transition, ever
    assert torch.equal(embedding(model), embeddings)  # the input embeddings never moved


def test_the_output_adapter_follows_the_policy_and_train_embeddings():
    def layers(model, **kwargs):
        return AdaptiveOptimizer(model, lr=1e-3, rank=2, **kwargs).output_adapter

    assert layers(tied_llama()) == "lm_head"  # the default, Hybrid
    assert layers(tied_llama(), policy="lora") is None
    assert layers(tied_llama(), policy="lora", train_embeddings="output_lora") == "lm_head"
    assert layers(tied_llama(), train_embeddings=False) is None
    model = tied_llama()
    assert layers(model, train_embeddings="output") is None and model.lm_head.weight is embedding(model)
    bert = tiny_bert()
    assert layers(bert) is None  # a classifier has no output layer: Hybrid's default changes nothing there
    with pytest.raises(ValueError, match="no linear output layer"):
        layers(tiny_bert(), train_embeddings="output_lora")
    with pytest.raises(ValueError, match="'output_lora'"):
        layers(tied_llama(), train_embeddings="lm_head")
    model = tied_llama()  # the FSDP2 recipe: adapters injected first (all FROZEN), the optimizer finds them
    inject_adapters(model, rank=2, mode="frozen", output_adapter=True)
    assert model.lm_head.mode is Mode.LORA and model.lm_head.weight_source == "model.embed_tokens.weight"
    assert layers(model) == "lm_head" and model.lm_head.mode is Mode.LORA


def test_hybrid_trains_a_classifiers_pooler_with_its_head_and_the_twin_does_too():
    from adaptopt.cli.methods import optimizer_kwargs
    from adaptopt.cli.twins import twin_method
    from adaptopt.policies import Hybrid

    def trained(**kwargs):
        model = tiny_bert()
        opt = AdaptiveOptimizer(model, **{"lr": 1e-3, "rank": 2, **kwargs})
        ids = {id(p) for group in opt.param_groups for p in group["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids and ("pooler" in n or "classifier" in n)}

    head = {"classifier.weight", "classifier.bias"}
    pooler = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert trained(policy=Hybrid()) == head | pooler
    assert trained(policy=Hybrid(head_inputs=False)) == trained(policy="lora") == head  # as PEFT's modules_to_save
    twin = twin_method({"method": "hybrid", "label": "h"}, {"0": {}}, policy_extra=Hybrid().trainable_extra())
    assert twin["trainable"] == ["pooler", "pre_classifier"]
    kwargs = optimizer_kwargs(twin, {"lr": 1e-3, "batch_size": 8, "max_length": 16}, "twin")  # as the CLI runs it
    assert trained(**{**kwargs, "rank": 2}) == head | pooler


def test_a_failed_constructor_leaves_the_tied_head_as_it_was():
    model = tied_llama()
    head, weight = model.lm_head, model.lm_head.weight
    with pytest.raises(ValueError, match="budget"):
        AdaptiveOptimizer(model, lr=1e-3, rank=2, memory_budget="0.5x")  # below LoRA's cost: refused after injection
    assert model.lm_head is head and head.weight is weight is embedding(model)
    assert model.config.tie_word_embeddings is True


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rank=st.integers(1, 6), alpha=st.sampled_from([1.0, 3.0, 16.0]), dtype=st.sampled_from([torch.float32,
                                                                                                 torch.float64]))
def test_a_merged_tied_head_holds_its_update_and_the_embeddings_do_not(rank, alpha, dtype):
    """Parity: the merged state dict, loaded into a plain untied model, computes what the adapted
    model computes; its input embeddings are the original ones."""
    torch.manual_seed(rank)
    model = tied_llama().to(dtype)
    original = embedding(model).detach().clone()
    AdaptiveOptimizer(model, lr=1e-3, rank=rank, alpha=alpha)
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
    state = merged_state_dict(model)
    assert torch.equal(state["model.embed_tokens.weight"], original)
    plain = tiny_llama().to(dtype)  # untied: both matrices are its own
    plain.load_state_dict(state)
    x = token_batch(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits)
        reference = model.model(x).last_hidden_state @ (original + model.lm_head.scaling * model.lm_head.lora_B
                                                        @ model.lm_head.lora_A).T
        torch.testing.assert_close(model(x).logits, reference)


def test_saved_and_exported_models_load_untied_and_exact(tmp_path, capsys):
    pytest.importorskip("accelerate")
    from adaptopt.integrations.hf import load_checkpoint
    torch.manual_seed(0)
    tied_llama().save_pretrained(tmp_path / "base")
    auto = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path / "base")
    opt = AdaptiveOptimizer(model, lr=1e-2, policy=HYBRID, rank=2, total_steps=3)
    x = token_batch(2, 7)
    train(model, opt, x, 3)
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    base_embeddings = auto.from_pretrained(tmp_path / "base").get_input_embeddings().weight

    save_plainly(model).save_pretrained(tmp_path / "saved")  # what the Trainer writes
    plain = auto.from_pretrained(tmp_path / "saved").eval()
    assert plain.config.tie_word_embeddings is False and plain.lm_head.weight is not embedding(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, trained, rtol=0, atol=1e-5)
    factors = sum(p.numel() * 4 for m in opt.layers.values() if m.lora_A is not None for p in (m.lora_A, m.lora_B))
    assert (tmp_path / "saved" / SIDECAR).stat().st_size < factors + 64 * 1024  # the head's copy is read back
    exact = auto.from_pretrained(tmp_path / "base")
    AdaptiveOptimizer(exact, lr=1e-2, policy=HYBRID, rank=2, total_steps=3)
    load_checkpoint(exact, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(exact.eval()(x).logits, trained)  # bit for bit, from the base model's embeddings
    assert torch.equal(embedding(exact), base_embeddings)

    save_adapters(model, tmp_path / "adapters")  # the copy is unchanged: not saved, rebuilt on load
    loaded = auto.from_pretrained(tmp_path / "base")
    load_adapters(loaded, tmp_path / "adapters")
    assert loaded.lm_head.base.weight is not embedding(loaded) and loaded.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, trained)
        loaded.lm_head.merge()  # lands in the head's own copy, not in the input embeddings
    assert torch.equal(embedding(loaded), base_embeddings)

    export_merged(model, tmp_path / "merged")
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, trained, rtol=0, atol=1e-5)
    assert torch.equal(embedding(merged), base_embeddings)

    if any(m.mode is Mode.FULL for m in opt.layers.values()):
        with pytest.raises(ValueError):
            export_peft(model, tmp_path / "peft")  # FULL blocks: no LoRA adapter expresses them
    head_only = auto.from_pretrained(tmp_path / "base")
    opt = AdaptiveOptimizer(head_only, lr=1e-2, policy="lora", rank=2, train_embeddings="output_lora")
    train(head_only, opt, x, 2)
    export_peft(head_only, tmp_path / "peft")
    assert "vLLM refuses LoRA weights on the output layer" in capsys.readouterr().out


def test_the_estimate_counts_the_output_adapter_and_the_tied_heads_copy():
    from adaptopt import estimate_memory
    without = estimate_memory(tied_llama(), {"method": "hybrid", "output_lora": False}, 2, 8, rank=4)
    with_head = estimate_memory(tied_llama(), "hybrid", 2, 8, rank=4)
    copy_bytes = VOCAB * 16 * 4  # vocab × hidden, float32: weights only
    factors = 4 * (VOCAB + 16)  # A (r × hidden) and B (vocab × r), trained
    assert with_head.weights - without.weights == copy_bytes + 4 * factors
    assert with_head.trained_elements - without.trained_elements == factors
    assert with_head.gradients - without.gradients == 4 * factors
