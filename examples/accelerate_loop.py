"""An accelerate loop with gradient accumulation. accelerate prepares the optimizer and the
data; the model is wrapped by AdaptiveDDP (rebuilt after transitions) rather than by
``accelerator.prepare(model)``, whose DDP would not follow the optimizer's transitions.

    python examples/accelerate_loop.py                       # one process
    accelerate launch --num_processes 2 examples/accelerate_loop.py
"""
from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from adaptopt.integrations.ddp import AdaptiveDDP
from synthetic_task import TaskDataset, accuracy, tiny_bert
from torch.utils.data import DataLoader

from adaptopt import AdaptiveOptimizer


def main(epochs: int = 3, accumulation: int = 2) -> dict:
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=not torch.cuda.is_available())
    model = tiny_bert(seed=0).to(accelerator.device)
    loader = DataLoader(TaskDataset(1024, seed=1), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    opt = AdaptiveOptimizer(model, lr=1e-3, lora_lr=2e-3, rank=8,
                            policy={"method": "automode", "u": 2, "t": 50, "bottom": 0})
    prepared_opt, loader = accelerator.prepare(opt, loader)
    opt.set_steps_per_epoch(math.ceil(len(loader) / accumulation))  # optimizer steps, after accumulation
    runner = AdaptiveDDP(model, opt) if accelerator.num_processes > 1 else None
    for _ in range(epochs):
        for batch in loader:
            net = runner.wrapper if runner is not None else model  # the current wrapper, after any rebuild
            with accelerator.accumulate(net):
                accelerator.backward(net(**batch).loss)
                prepared_opt.step()  # accelerate skips it on accumulation micro-steps
                prepared_opt.zero_grad()
    test = TaskDataset(256, seed=2)
    result = {"accuracy": accuracy(model, test.tokens.to(accelerator.device), test.labels.to(accelerator.device)),
              "steps": opt.step_count,
              "decisions": sorted({h["step"] for h in opt.history if h["reason"] == "decision"})}
    if accelerator.is_main_process:
        print(opt.summary())
        print(result)
    return result


if __name__ == "__main__":
    main()
