"""What the Trainer and TRL's SFTTrainer write loads as the trained model with plain from_pretrained."""
from __future__ import annotations

import pytest
import torch

from adaptopt import AdaptiveOptimizer, Mode, inject_adapters
from tests.tiny_models import VOCAB, tiny_bert, tiny_llama, token_batch, transformers

pytest.importorskip("accelerate")
from adaptopt.integrations.hf import AdaptoptCallback, load_checkpoint  # noqa: E402

from tests.test_hf_trainer import make_trainer  # noqa: E402

AUTOMODE = {"method": "automode", "u": 2, "t": 50, "rank": 2, "score_steps": 1}  # FULL and LoRA layers
WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]


def unwrapped(trainer):
    """The trained model with accelerate's mixed-precision forward wrapper taken off."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()


def train_steps(model, opt, x, steps):
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def assert_loads_plainly(folder, trained, auto, x, atol=1e-5):
    plain = auto.from_pretrained(folder).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        got, expected = plain(x).logits, trained(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    return plain


def test_trainer_checkpoints_and_saved_models_load_with_plain_from_pretrained(tmp_path):
    trainer, opt, _ = make_trainer(tmp_path, policy=AUTOMODE)
    trainer.train()
    assert {m.mode for m in opt.layers.values()} >= {Mode.FULL, Mode.LORA}  # a mixed model is saved
    model = unwrapped(trainer)
    trainer.save_model(str(tmp_path / "final"))
    x = token_batch(3, 9)
    assert_loads_plainly(tmp_path / "final", model, transformers.AutoModelForSequenceClassification, x)

    # a checkpoint mid-run: the plain load equals the exact load into an adapted model
    exact = tiny_bert(dropout=0.0)
    inject_adapters(exact, rank=2)
    load_checkpoint(exact, tmp_path / "checkpoint-5").eval()
    assert_loads_plainly(tmp_path / "checkpoint-5", exact, transformers.AutoModelForSequenceClassification, x)


def test_a_4bit_checkpoint_refuses_a_plain_load_and_loads_with_the_one_call(tmp_path):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    opt = AdaptiveOptimizer(model, lr=1e-2, policy="qlora", rank=2)
    x = token_batch(2, 7)
    train_steps(model, opt, x, 2)
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    fresh = tiny_llama()
    fresh.load_state_dict(base)
    inject_adapters(fresh, rank=2, quantize="nf4")
    load_checkpoint(fresh, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model.eval()(x).logits)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(tiny_llama(layers=3), tmp_path / "saved")


def word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def test_trl_sft_trainer_with_its_defaults_saves_a_plainly_loadable_model(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (12,), generator=g)) for _ in range(32)]
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, save_steps=3,
                         learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True, max_length=16)
    assert args.gradient_checkpointing and args.bf16  # TRL's defaults
    opt = AdaptiveOptimizer(model, lr=1e-3, rank=2, steps_per_epoch=3, policy=AUTOMODE)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=word_tokenizer(), optimizers=(opt, None), callbacks=[AdaptoptCallback()])
    trainer.train()
    assert any(h["mode"] == "full" for h in opt.history)
    trainer.save_model(str(tmp_path / "final"))
    x = token_batch(2, 9)
    assert_loads_plainly(tmp_path / "final", unwrapped(trainer), transformers.AutoModelForCausalLM, x)
    exact = tiny_llama()
    exact.load_state_dict({k: v for k, v in transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "checkpoint-3").state_dict().items()})
    inject_adapters(exact, rank=2)
    load_checkpoint(exact, tmp_path / "checkpoint-3")
    assert_loads_plainly(tmp_path / "checkpoint-3", exact.eval(), transformers.AutoModelForCausalLM, x)


def test_export_merged_with_the_tokenizer_serves_a_text_generation_pipeline(tmp_path):
    from adaptopt import export_merged
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    inject_adapters(model, rank=2)
    with pytest.raises(TypeError, match="save_pretrained"):
        export_merged(model, tmp_path / "bad", tokenizer="w1 w2")
    export_merged(model, tmp_path / "merged", tokenizer=word_tokenizer())
    generate = transformers.pipeline("text-generation", model=str(tmp_path / "merged"))
    out = generate("w1 w2 w3", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out.startswith("w1 w2 w3") and len(out.split()) > 3


def test_saved_folders_are_plain_small_and_silent_and_the_sidecar_keeps_them_exact(tmp_path):
    """save_pretrained (as the Trainer's checkpoints and save_model call it, once the callback is in)
    writes only the plain names — from_pretrained logs nothing about unexpected keys — at the base
    model's size; the factors go to the sidecar, unchanged base weights are read back from the base
    model folder the run started from, checked by fingerprint."""
    import os

    from transformers.utils import logging as hf_logging

    from adaptopt.formats.hf_folders import SIDECAR, save_plainly
    from tests.test_hf_trainer import Recorder
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # name_or_path: the folder
    opt = AdaptiveOptimizer(model, lr=1e-2, policy="lora", rank=2)
    x = token_batch(2, 7)
    train_steps(model, opt, x, 2)
    save_plainly(model).save_pretrained(tmp_path / "saved")
    base_size = os.path.getsize(tmp_path / "base" / "model.safetensors")
    assert os.path.getsize(tmp_path / "saved" / "model.safetensors") <= base_size + 1024  # no second copy of W
    sidecar = tmp_path / "saved" / SIDECAR
    factors = sum(p.numel() * 4 for m in opt.layers.values() for p in (m.lora_A, m.lora_B))
    assert os.path.getsize(sidecar) < factors + 64 * 1024  # the factors, not the base weights
    recorder = Recorder()
    library = hf_logging.get_logger("transformers")
    library.addHandler(recorder)
    try:
        assert_loads_plainly(tmp_path / "saved", model.eval(), transformers.AutoModelForCausalLM, x)
    finally:
        library.removeHandler(recorder)
    assert not any("unexpected" in m.lower() or "not used" in m.lower() for m in recorder.messages), recorder.messages
    exact = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    inject_adapters(exact, rank=2)
    load_checkpoint(exact, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(exact.eval()(x).logits, model(x).logits)  # bit for bit
    for name, layer in opt.layers.items():
        assert torch.equal(exact.get_submodule(name).base.weight, layer.base.weight)
    other = tiny_llama()  # another base model under the same folder name: refused by fingerprint
    other.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="is not the one the run started from"):
        load_checkpoint(exact, tmp_path / "saved")
