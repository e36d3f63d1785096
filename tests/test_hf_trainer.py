"""The HF Trainer drives AdaptiveOptimizer: accumulation, scheduler, evaluation, checkpoints, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptopt import AdaptiveOptimizer, Mode
from tests.tiny_models import VOCAB, tiny_bert, transformers

pytest.importorskip("accelerate")
from adaptopt.integrations.hf import STATE_FILE, AdaptoptCallback  # noqa: E402

AUTOMODE = {"method": "automode", "u": 2, "t": 50, "bottom": 25, "rank": 2, "score_steps": 1}
# ranks set from activations at step 2: the checkpoint's factor shapes differ from a fresh model's
RANKS = {"method": "rank_allocation", "strategy": "activation", "budget": 4, "calibration_steps": 2}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, 9), generator=g)
        self.labels = (self.tokens[:, 1] > VOCAB // 2).long()  # learnable from the tokens

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.labels[i]}


class FullWeights(transformers.TrainerCallback):
    """Copies every FULL layer's weight after each optimizer step."""

    def __init__(self, opt: AdaptiveOptimizer) -> None:
        self.opt, self.seen = opt, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.seen[state.global_step] = {n: m.base.weight.detach().clone()
                                        for n, m in self.opt.layers.items() if m.mode is Mode.FULL}


def make_trainer(out, *, policy=AUTOMODE, extra_callbacks=(), **arguments):
    torch.manual_seed(0)
    model = tiny_bert(dropout=0.0).train()
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1, eval_strategy="epoch", save_strategy="steps",
        save_steps=5, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=1.0,
        **arguments)
    opt = AdaptiveOptimizer(model, lr=args.learning_rate, policy=policy, rank=2)
    callbacks = [AdaptoptCallback(), *(c(opt) for c in extra_callbacks)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(32, 1), eval_dataset=Rows(8, 2),
                                   optimizers=(opt, None), callbacks=callbacks)
    return trainer, opt, callbacks


def test_trainer_runs_the_policy_and_promoted_layers_train(tmp_path):
    trainer, opt, (callback, watcher) = make_trainer(tmp_path, extra_callbacks=(FullWeights,))
    trainer.train()
    assert opt.steps_per_epoch == 4  # 8 batches / accumulation 2
    assert opt.policy.run_steps == trainer.state.max_steps == 8  # for decisions at a fraction of the run
    assert opt.step_count == trainer.state.global_step == 8
    decisions = sorted({h["step"] for h in opt.history if h["reason"] == "decision"})
    assert decisions and set(decisions) <= {2, 4, 6, 8}
    # a layer FULL across two consecutive steps had its weight changed by the Trainer's update
    moved = [float((watcher.seen[s + 1][n] - w).abs().max())
             for s, layers in watcher.seen.items() if s + 1 in watcher.seen
             for n, w in layers.items() if n in watcher.seen[s + 1]]
    assert moved and min(moved) > 0
    # one scheduler over fixed groups: every group decayed on the same linear curve
    lrs = trainer.lr_scheduler.get_last_lr()
    assert len(lrs) == len(opt.param_groups) and all(lr == 0.0 for lr in lrs)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("adaptopt/full" in h and "adaptopt/trainable_params" in h for h in logged)
    assert any("adaptopt/transitions" in h for h in trainer.state.log_history)
    assert any("eval_loss" in h for h in trainer.state.log_history)
    summary = json.loads((tmp_path / "checkpoint-5" / STATE_FILE).read_text())
    assert summary["step"] == 5 and set(summary["layers"]) == set(opt.layers)


def test_resume_from_a_trainer_checkpoint_equals_the_uninterrupted_run(tmp_path):
    trainer, opt, _ = make_trainer(tmp_path / "a", policy=RANKS)
    trainer.train()
    expected = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    at_save = json.loads((tmp_path / "a" / "checkpoint-5" / STATE_FILE).read_text())["layers"]
    initial = {n: m.rank for n, m in make_trainer(tmp_path / "x", policy=RANKS)[1].layers.items()}
    assert {n: v["rank"] for n, v in at_save.items()} != initial  # the checkpoint's factor shapes differ

    checkpoint = str(tmp_path / "a" / "checkpoint-5")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)  # the plain folder
    assert not any(".lora_" in n or ".base." in n for n in plain.state_dict())
    with pytest.raises(ValueError, match=r"holds no adaptopt_layers.safetensors .*resume_from_checkpoint=PATH"):
        make_trainer(tmp_path / "elsewhere", policy=RANKS)[0].train(resume_from_checkpoint=checkpoint)
    resumed, opt2, _ = make_trainer(tmp_path / "b", policy=RANKS, resume_from_checkpoint=checkpoint)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert opt2.history == opt.history
    for name, p in resumed.model.named_parameters():
        assert name in expected, name
        assert torch.allclose(p, expected[name], atol=1e-6), name


def test_from_training_args_takes_the_trainers_hyperparameters(tmp_path):
    from adaptopt.integrations.hf import from_training_args
    args = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.05,
                                          adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, report_to=[],
                                          use_cpu=True)
    opt = from_training_args(tiny_bert(), args, policy="lora", lora_lr=1e-3)
    assert (opt.lr, opt.lora_lr) == (3e-4, 1e-3)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-7
    assert opt.defaults["weight_decay"] == 0.05


def test_the_callback_without_an_adaptive_optimizer_says_what_to_pass(tmp_path):
    model = tiny_bert()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(8, 1), callbacks=[AdaptoptCallback()])
    with pytest.raises(ValueError, match=r"optimizers=\(AdaptiveOptimizer\(model"):
        trainer.train()


class Recorder(__import__("logging").Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def test_transitions_show_where_a_trainer_user_looks(tmp_path):
    from transformers.utils import logging as hf_logging
    library = hf_logging.get_logger("transformers")
    recorder, level = Recorder(), hf_logging.get_verbosity()
    library.addHandler(recorder)
    try:
        trainer, opt, _ = make_trainer(tmp_path / "info", log_level="info")
        trainer.train()
        assert any("→ full" in m for m in recorder.messages)  # through transformers' own handler
        recorder.messages.clear()
        hf_logging.set_verbosity_warning()  # the Trainer's default verbosity
        trainer, opt, _ = make_trainer(tmp_path / "warning")
        trainer.train()
        decisions = sorted({h["step"] for h in opt.history if h["reason"] == "decision"})
        summaries = [m for m in recorder.messages if m.startswith("adaptopt step ")]
        assert [int(m.split()[2].rstrip(":")) for m in summaries] == decisions  # one line per decision
        moved = sum(1 for h in opt.history if h["step"] == decisions[0])
        assert f"{moved} layer(s) moved" in summaries[0] and "trainable" in summaries[0]
        assert not any(" → " in m for m in recorder.messages)  # the per-layer detail stays at INFO
    finally:
        library.removeHandler(recorder)
        hf_logging.set_verbosity(level)


def test_deepspeed_is_refused_by_name_with_the_alternatives(tmp_path):
    """ZeRO partitions parameters and fixes the trained set: refused at construction (parameters marked
    as DeepSpeed's) and by the callback (TrainingArguments.deepspeed), naming FSDP2 and DDP."""
    from types import SimpleNamespace

    model = tiny_bert()
    for p in model.parameters():
        p.ds_id = 0  # what deepspeed.zero.Init leaves on every parameter
    with pytest.raises(ValueError, match=r"does not run under DeepSpeed ZeRO.*Use FSDP2 .* or DDP"):
        AdaptiveOptimizer(model, lr=1e-3, policy="lora", rank=2)
    assert not [m for m in model.modules() if type(m).__name__ == "LoRALinear"]  # nothing was changed
    with pytest.raises(ValueError, match=r"runs DeepSpeed \(TrainingArguments.deepspeed\).*FSDP2"):
        AdaptoptCallback().on_init_end(SimpleNamespace(deepspeed="ds_config.json"), None, None, model=tiny_bert())


def test_the_trainers_own_ddp_keeps_ranks_identical_through_transitions_and_resume(tmp_path):
    """torchrun + the Trainer's DDP (no AdaptiveDDP): without adaptopt's help a layer promoted to FULL
    trains per rank and the ranks drift apart silently; with the callback they stay identical, and a
    run resumed from a checkpoint ends where the uninterrupted one did."""
    from tests.helpers import torchrun
    worker = Path(__file__).parent / "trainer_ddp_worker.py"
    run = torchrun(worker, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    whole = json.loads((tmp_path / "result.json").read_text())
    assert whole["ranks_identical"] and whole["transitions"] > 0 and whole["steps"] == 12
    run = torchrun(worker, tmp_path, "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["ranks_identical"] and resumed["checksum"] == whole["checksum"]
