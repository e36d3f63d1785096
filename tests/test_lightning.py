"""Lightning: configure_optimizers returns an AdaptiveOptimizer; with the callback, fit → save → resume
equals one uninterrupted fit."""
from __future__ import annotations

import logging

import pytest
import torch

from adaptopt import AdaptiveOptimizer
from tests.tiny_models import tiny_bert

L = pytest.importorskip("lightning.pytorch")
from adaptopt.integrations.lightning import AdaptoptLightning, steps_per_epoch  # noqa: E402

from tests.test_hf_trainer import Rows  # noqa: E402

POLICY = {"method": "automode", "u": 2, "t": 50, "rank": 2, "score_steps": 1}


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_bert(dropout=0.0).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(Rows(40, 1), batch_size=4)

    def configure_optimizers(self):
        return AdaptiveOptimizer(self.model, lr=1e-2, policy=POLICY, rank=2)


def fit(tmp_path, epochs, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    module = Classifier()
    callback = AdaptoptLightning()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, accumulate_grad_batches=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[callback])
    trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer, module, callback.optimizers[0]


def test_fit_save_resume_equals_an_uninterrupted_fit(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        whole, whole_module, whole_opt = fit(tmp_path / "a", 2)
    assert whole_opt.steps_per_epoch == 4 == steps_per_epoch(whole)  # ⌈10 batches / 3⌉
    assert whole_opt.policy.run_steps == 8 == whole.estimated_stepping_batches  # 2 epochs
    assert whole_opt.step_count == 8 and any(h["mode"] == "full" for h in whole_opt.history)
    assert any("→ full" in r.getMessage() for r in caplog.records)

    half, _, _ = fit(tmp_path / "b", 1)
    half.save_checkpoint(tmp_path / "half.ckpt")
    resumed, module, opt = fit(tmp_path / "c", 2, ckpt_path=tmp_path / "half.ckpt")
    assert opt.history == whole_opt.history
    expected = dict(whole_module.named_parameters())
    got = dict(module.named_parameters())
    assert got.keys() == expected.keys()
    for name, p in got.items():
        assert torch.equal(p, expected[name]), name


def test_without_an_adaptive_optimizer_the_callback_says_what_to_return(tmp_path):
    class Plain(Classifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[AdaptoptLightning()],
                        default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"return AdaptiveOptimizer\(self"):
        trainer.fit(Plain())
