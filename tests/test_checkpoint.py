"""safetensors persistence: save/load round trips, merged export, PEFT export, atomic refusal."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from adaptopt import (
    AdaptiveOptimizer,
    Fixed,
    LayerDecision,
    LoRALinear,
    Mode,
    export_merged,
    export_peft,
    find_adapters,
    load_adapters,
    save_adapters,
)
from adaptopt.formats.checkpoint import CONFIG_FILE, adapters_file
from tests.tiny_models import VOCAB, token_batch, transformers

BUILDERS = {
    "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)),
}
TOKENS = token_batch(batch=3, length=9, seed=42)


def fresh(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()


def loss_of(model: torch.nn.Module, kind: str, seed: int) -> torch.Tensor:
    tokens = token_batch(batch=4, length=9, seed=seed)
    labels = tokens % 2 if kind != "bert" else tokens[:, 0] % 2
    return model(input_ids=tokens, labels=labels).loss


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def train(model: torch.nn.Module, opt: AdaptiveOptimizer, kind: str, steps: int, start: int = 0) -> None:
    model.train()
    for i in range(start, start + steps):
        loss_of(model, kind, i).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def mixed_run(kind: str, quantize=None) -> tuple[torch.nn.Module, AdaptiveOptimizer]:
    """Block 0 FULL, block 1 LoRA rank 2 then (step 3) its first layers FROZEN — folded — and
    one re-ranked to 4: every kind of state save/load must carry."""
    model = fresh(kind)
    policy = Fixed({r"\w+\.0\..*": Mode.FULL}, default=(Mode.LORA, 2))
    opt = AdaptiveOptimizer(model, lr=1e-3, policy=policy, rank=2, quantize=quantize,
                            trainable=("classifier", "score", "lm_head"))
    train(model, opt, kind, 3)
    block1 = [n for n in opt.layers if ".1." in n]
    opt.apply({block1[0]: Mode.FROZEN, block1[1]: LayerDecision(Mode.LORA, 4)})
    train(model, opt, kind, 2, start=3)
    return model, opt


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_then_load_into_a_fresh_base_model_gives_identical_logits(kind, tmp_path):
    model, opt = mixed_run(kind)
    save_adapters(model, tmp_path)
    restored = fresh(kind)
    layers = load_adapters(restored, tmp_path)
    assert torch.equal(logits(restored), logits(model))
    for name, module in opt.layers.items():
        assert (layers[name].mode, layers[name].rank, layers[name].alpha) == (module.mode, module.rank, module.alpha)
    # only what changed was written: block 1's untouched LoRA layers keep their base weight out
    with safe_open(str(adapters_file(tmp_path)), "pt") as f:
        keys = set(f.keys())
    block1 = [n for n in opt.layers if ".1." in n]
    assert f"{block1[0]}.base.weight" in keys  # folded on LORA → FROZEN
    assert f"{block1[-1]}.base.weight" not in keys and f"{block1[-1]}.lora_A" in keys
    assert not any("embed" in k or "wte" in k for k in keys)
    assert all(f"{n}.base.weight" in keys for n in opt.layers if ".0." in n)  # FULL
    # saved again from the loaded model (nothing trainable now), everything still comes back
    for p in restored.parameters():
        p.requires_grad_(False)
    save_adapters(restored, tmp_path / "again")
    again = fresh(kind)
    load_adapters(again, tmp_path / "again")
    assert torch.equal(logits(again), logits(model))


def test_quantized_round_trip_keeps_deltas_and_frozen_factors(tmp_path):
    pytest.importorskip("bitsandbytes")
    model, opt = mixed_run("llama", quantize="nf4")
    block0, block1 = [n for n in opt.layers if ".0." in n], [n for n in opt.layers if ".1." in n]
    assert opt.layers[block0[0]].delta is not None and opt.layers[block1[0]].mode is Mode.FROZEN
    assert opt.layers[block1[0]].lora_A is not None  # a 4-bit FROZEN layer keeps its (frozen) factors
    save_adapters(model, tmp_path)
    restored = fresh("llama")
    layers = load_adapters(restored, tmp_path)
    assert torch.equal(logits(restored), logits(model))
    assert layers[block1[0]].lora_A is not None and layers[block0[0]].delta is not None
    record = json.loads((tmp_path / CONFIG_FILE).read_text())["layers"][block0[0]]
    assert record["quantize"]["quant_type"] == "nf4"


def test_merged_layers_round_trip_merged(tmp_path):
    model, opt = mixed_run("gpt2")
    before = logits(model)
    for m in opt.layers.values():
        m.merge()
    save_adapters(model, tmp_path)
    restored = fresh("gpt2")
    layers = load_adapters(restored, tmp_path)
    assert all(m.merged for m in layers.values())
    assert torch.equal(logits(restored), logits(model))
    for m in layers.values():
        m.unmerge()
    assert torch.allclose(logits(restored), before, atol=1e-5)


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, snapshot: dict, flags: dict) -> bool:
    state = model.state_dict()
    return (not find_adapters(model) and state.keys() == snapshot.keys()
            and all(torch.equal(state[k], v) for k, v in snapshot.items())
            and {n: p.requires_grad for n, p in model.named_parameters()} == flags)


def test_mismatched_files_are_refused_with_every_problem_listed_and_nothing_loaded(tmp_path):
    model, _ = mixed_run("bert")
    save_adapters(model, tmp_path)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, num_labels=2)
    wider = transformers.BertForSequenceClassification(config)
    snapshot, flags = _snapshot(wider), {n: p.requires_grad for n, p in wider.named_parameters()}
    with pytest.raises(ValueError) as err:
        load_adapters(wider, tmp_path)
    message = str(err.value)
    assert "nothing was loaded" in message and "query" in message and "(16 × 16)" in message
    assert "classifier.weight: shape (2, 16) in the file, (2, 32) in the model" in message
    assert _unchanged(wider, snapshot, flags)

    half = fresh("bert").to(torch.bfloat16)
    snapshot, flags = _snapshot(half), {n: p.requires_grad for n, p in half.named_parameters()}
    with pytest.raises(ValueError, match="dtype float32 in the file, bfloat16 in the model"):
        load_adapters(half, tmp_path)
    assert _unchanged(half, snapshot, flags)

    shallow = fresh("bert")
    shallow.bert.encoder.layer = shallow.bert.encoder.layer[:1]
    with pytest.raises(ValueError, match="no module of that name"):
        load_adapters(shallow, tmp_path)

    adapted = fresh("bert")
    AdaptiveOptimizer(adapted, policy="lora")
    with pytest.raises(ValueError, match="fresh base model"):
        load_adapters(adapted, tmp_path)

    with pytest.raises(ValueError, match="no adaptopt adapters"):
        load_adapters(fresh("bert"), tmp_path / "missing")


def test_a_failure_while_building_layers_puts_the_model_back(tmp_path, monkeypatch):
    model, _ = mixed_run("bert")
    save_adapters(model, tmp_path)
    target = fresh("bert")
    snapshot, flags = _snapshot(target), {n: p.requires_grad for n, p in target.named_parameters()}
    import adaptopt.formats.checkpoint as checkpoint
    real, calls = checkpoint._build_layer, []

    def failing(name, base, record):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("simulated failure")
        return real(name, base, record)

    monkeypatch.setattr(checkpoint, "_build_layer", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapters(target, tmp_path)
    assert _unchanged(target, snapshot, flags)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_export_merged_loads_with_plain_transformers(kind, tmp_path):
    model, _ = mixed_run(kind)
    export_merged(model, tmp_path)
    auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
    plain = auto.from_pretrained(str(tmp_path)).eval()
    assert not find_adapters(plain)
    assert not any("lora" in n or ".base." in n for n, _ in plain.named_parameters())
    assert torch.allclose(logits(plain), logits(model), atol=1e-5, rtol=1e-5)


def test_export_merged_dequantizes_4bit_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    model, _ = mixed_run("llama", quantize="nf4")
    export_merged(model, tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert torch.allclose(logits(plain), logits(model), atol=1e-4, rtol=1e-4)


def _lora_run(kind: str, head: bool = True) -> tuple[torch.nn.Module, AdaptiveOptimizer]:
    """LoRA everywhere with per-layer ranks 2/3/4 and one layer at another alpha; the head trains (if any)."""
    model = fresh(kind)
    opt = AdaptiveOptimizer(model, lr=1e-3, policy="lora", rank=2, trainable=("classifier",) if head else ())
    names = list(opt.layers)
    opt.apply({names[1]: LayerDecision(Mode.LORA, 4), names[2]: LayerDecision(Mode.LORA, 3)})
    opt.layers[names[3]].alpha = 5.0
    train(model, opt, kind, 4)
    return model, opt


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_export_peft_loads_in_peft_with_the_same_logits(kind, tmp_path):
    peft = pytest.importorskip("peft")
    base = fresh(kind)
    base.save_pretrained(str(tmp_path / "base"))
    model, opt = _lora_run(kind)
    export_peft(model, tmp_path / "adapter", modules_to_save=True)  # for PEFT: the trained head rides along
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(set(config["rank_pattern"].values())) == [3, 4]
    assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == config["r"]  # scaling 1
    if kind == "bert":
        assert config["modules_to_save"] == ["classifier"]
    auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
    loaded = peft.PeftModel.from_pretrained(auto.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    loaded.eval()
    effect = float((logits(model) - logits(fresh(kind))).abs().max())  # what the adapters changed
    assert effect > 1e-3
    assert float((logits(loaded) - logits(model)).abs().max()) <= 1e-3 * effect


def served_like_vllm(base: torch.nn.Module, adapter_dir) -> torch.nn.Module:
    """Apply a PEFT adapter the way vLLM does: one global scaling lora_alpha / r (or / √r with rsLoRA)
    for every layer, rank_pattern and alpha_pattern ignored; shapes from the tensors."""
    from safetensors.torch import load_file
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise ValueError("vLLM only supports modules_to_save being None")  # vLLM's own words
    scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = dict(base.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                name = key[len("base_model.model."):-len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                delta = scaling * (b.double() @ a.double())
                layer = modules[name]
                layer.weight += (delta.T if config["fan_in_fan_out"] else delta).to(layer.weight.dtype)
            elif ".lora_" not in key:
                base.get_parameter(key[len("base_model.model."):]).copy_(tensors[key])
    return base


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_export_peft_means_the_same_under_one_global_scaling(kind, tmp_path):
    model, _ = _lora_run(kind, head=False)
    for layer in list(model.modules()):
        if isinstance(layer, LoRALinear):
            layer.rslora = True  # a scaling PEFT and vLLM compute differently unless it is folded
            break
    export_peft(model, tmp_path / "adapter")
    served = served_like_vllm(fresh(kind), tmp_path / "adapter")
    effect = float((logits(model) - logits(fresh(kind))).abs().max())
    assert effect > 1e-3 and float((logits(served) - logits(model)).abs().max()) <= 1e-3 * effect


def test_export_peft_with_svd_rank_exports_full_and_folded_layers(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    base = fresh("bert")
    base.save_pretrained(str(tmp_path / "base"))
    model, opt = mixed_run("bert")
    with pytest.raises(ValueError, match="pass base_model="):
        export_peft(model, tmp_path / "no_base", svd_rank=4)
    export_peft(model, tmp_path / "full", svd_rank=16, base_model=fresh("bert"))
    full_layers = [n for n in opt.layers if ".0." in n]
    assert all(f"{n}: rank 16 keeps 100.00%" in line and "bias moved by up to" in line
               for n, line in zip(full_layers, capsys.readouterr().out.splitlines()))
    original = fresh("bert")
    with torch.no_grad():  # adapters carry no bias: put the FULL layers' biases back, then the export is exact
        for n in full_layers:
            opt.layers[n].base.bias.copy_(original.get_parameter(f"{n}.bias"))
    export_peft(model, tmp_path / "full", svd_rank=16, base_model=original, modules_to_save=True)  # exact: full rank
    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base")),
        str(tmp_path / "full")).eval()
    effect = float((logits(model) - logits(fresh("bert"))).abs().max())
    assert float((logits(loaded) - logits(model)).abs().max()) <= 1e-3 * effect
    export_peft(model, tmp_path / "low", svd_rank=1, base_model=fresh("bert").state_dict())
    kept = [float(line.rsplit("keeps ", 1)[1].split("%")[0]) for line in capsys.readouterr().out.splitlines()
            if " keeps " in line]
    assert kept and min(kept) < 100.0


def test_export_peft_refuses_what_lora_cannot_express(tmp_path):
    model, opt = mixed_run("bert")
    with pytest.raises(ValueError) as err:
        export_peft(model, tmp_path)
    message = str(err.value)
    assert "FULL" in message and "export_merged" in message and "svd_rank=k" in message
    folded = [n for n in opt.layers if ".1." in n][0]
    assert f"{folded}: its base.weight changed" in message
    assert not (tmp_path / "adapter_config.json").exists()


def test_export_peft_by_default_writes_what_a_lora_only_server_loads_and_names_what_it_leaves(tmp_path, capsys):
    """FULL blocks train their norms and the head trains: by default neither rides in the adapter
    (vLLM refuses modules_to_save); each is named with how much it changed. With modules_to_save=True
    PEFT gets them, and a vLLM-style loader refuses that adapter by vLLM's own rule."""
    model, opt = mixed_run("bert")
    original = fresh("bert")
    export_peft(model, tmp_path / "lora_only", svd_rank=16, base_model=original)
    config = json.loads((tmp_path / "lora_only" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["task_type"] is None  # PEFT would look for the head
    lines = capsys.readouterr().out.splitlines()
    left = {line.split(": ", 2)[1]: line for line in lines if "not carried by the LoRA adapter" in line}
    block = next(n for n in opt.layers if ".0." in n).split(".attention")[0]  # the FULL block
    assert "classifier" in left and any(owner.startswith(block) and "LayerNorm" in owner for owner in left)
    for line in left.values():
        percents = [float(x) for x in re.findall(r"changed by ([0-9.]+)%", line)]
        assert percents and max(percents) > 0, line
    served = served_like_vllm(fresh("bert"), tmp_path / "lora_only")  # loads: nothing it refuses
    assert float((logits(served) - logits(model)).abs().max()) > 0  # and runs without what was named
    export_peft(model, tmp_path / "for_peft", svd_rank=16, base_model=original, modules_to_save=True)
    kept = json.loads((tmp_path / "for_peft" / "adapter_config.json").read_text())["modules_to_save"]
    assert "classifier" in kept and set(left) == set(kept)
    with pytest.raises(ValueError, match="vLLM only supports modules_to_save being None"):
        served_like_vllm(fresh("bert"), tmp_path / "for_peft")
