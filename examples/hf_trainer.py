"""The Hugging Face Trainer with AdaptiveOptimizer: AutoMode decides every layer's mode twice
per epoch, with gradient accumulation, a linear-warmup scheduler, evaluation each epoch and
checkpoints; then the result is saved three ways.

    python examples/hf_trainer.py [output_dir]

The two lines that matter are marked "adaptopt:". Runs in about a minute on a CPU (tiny BERT
built from a config, synthetic task: no download).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from adaptopt.integrations.hf import AdaptoptCallback
from synthetic_task import TaskDataset, tiny_bert
from transformers import Trainer, TrainingArguments

from adaptopt import AdaptiveOptimizer, export_merged, save_adapters


def compute_metrics(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main(output_dir: str | None = None, epochs: int = 3) -> dict:
    out = Path(output_dir or tempfile.mkdtemp(prefix="adaptopt-trainer-"))
    model = tiny_bert(seed=0)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=16, gradient_accumulation_steps=2,
                             num_train_epochs=epochs, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=5,
                             eval_strategy="epoch", save_strategy="epoch", logging_steps=10, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True)
    # adaptopt: the optimizer owns the layer modes; the Trainer builds its scheduler over it
    opt = AdaptiveOptimizer(model, lr=args.learning_rate, lora_lr=2e-3, rank=8,
                            policy={"method": "automode", "u": 2, "t": 50, "bottom": 0})
    trainer = Trainer(model=model, args=args, train_dataset=TaskDataset(1024, seed=1),
                      eval_dataset=TaskDataset(256, seed=2), compute_metrics=compute_metrics,
                      optimizers=(opt, None), callbacks=[AdaptoptCallback()])  # adaptopt: the callback
    trainer.train()
    metrics = trainer.evaluate()
    print(opt.summary())
    transitions = [h for h in trainer.state.log_history if "adaptopt/transitions" in h]
    print(f"{len(transitions)} decision steps changed modes; eval accuracy {metrics['eval_accuracy']:.3f}")
    save_adapters(model, out / "adapters")       # only what changed, reload with load_adapters
    export_merged(model, out / "merged")         # a plain transformers model directory
    print(f"adapters in {out / 'adapters'}, merged model in {out / 'merged'}")
    return {"accuracy": metrics["eval_accuracy"], "transitions": len(transitions), "output_dir": out,
            "steps_per_epoch": opt.steps_per_epoch}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
