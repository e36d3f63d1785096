"""PyTorch Lightning with AdaptiveOptimizer: AutoMode decides every layer's mode twice per epoch;
the run stops after one epoch, saves a checkpoint, and a second Trainer resumes it to the end —
landing exactly where one uninterrupted run lands.

    python examples/lightning_fit.py [output_dir]

The two lines that matter are marked "adaptopt:". Runs in seconds on a CPU (tiny BERT built from a
config, synthetic task: no download).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch
from adaptopt.integrations.lightning import AdaptoptLightning
from synthetic_task import TaskDataset, accuracy, make_task, tiny_bert

from adaptopt import AdaptiveOptimizer


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert(seed=0)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        # adaptopt: return the optimizer; the callback builds it early enough for resume
        return AdaptiveOptimizer(self.model, lr=1e-3, lora_lr=2e-3, rank=8,
                                 policy={"method": "automode", "u": 2, "t": 50})


def fit(out: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, Classifier]:
    L.seed_everything(0, verbose=False)
    module = Classifier()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                        accumulate_grad_batches=2, callbacks=[AdaptoptLightning()])  # adaptopt: the callback
    loader = torch.utils.data.DataLoader(TaskDataset(1024, seed=1), batch_size=16)
    trainer.fit(module, loader, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer, module


def main(output_dir: str | None = None, epochs: int = 3) -> dict:
    out = Path(output_dir or tempfile.mkdtemp(prefix="adaptopt-lightning-"))
    _, whole = fit(out / "whole", epochs)
    first, _ = fit(out / "first", 1)
    first.save_checkpoint(out / "epoch1.ckpt")
    resumed, module = fit(out / "resumed", epochs, ckpt_path=out / "epoch1.ckpt")
    opt = resumed.optimizers[0]
    same = all(torch.equal(p, q) for p, q in zip(module.parameters(), whole.parameters()))
    tokens, labels = make_task(256, torch.Generator().manual_seed(2))
    result = {"steps_per_epoch": opt.steps_per_epoch, "transitions": len(opt.history), "resume_exact": same,
              "accuracy": accuracy(module.model, tokens, labels)}
    print(opt.summary())
    print(f"resumed run equals the uninterrupted one: {same}; accuracy {result['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
