"""An accelerate loop with gradient accumulation, checkpoint and resume. accelerate prepares the
optimizer and the data; the model is wrapped by AdaptiveDDP (rebuilt after transitions) rather
than by ``accelerator.prepare(model)``, whose DDP would not follow the optimizer's transitions.

    python examples/accelerate_loop.py                                   # one process
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py OUT
    accelerate launch ... examples/accelerate_loop.py OUT --stop-after 1     # checkpoint after one epoch
    accelerate launch ... examples/accelerate_loop.py OUT --resume           # ... and finish the run

(On a machine without GPUs, ``--multi_gpu`` runs the processes on the CPU over gloo.) Resuming
from the checkpoint ends with the same model, bit for bit, as the uninterrupted run: the
checkpoint holds the model's and the optimizer's state dicts (modes, ranks, Adam moments by
name) and every rank's RNG state (dropout); each epoch's data order is seeded by the epoch.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from adaptopt.integrations.ddp import AdaptiveDDP
from synthetic_task import TaskDataset, accuracy, tiny_bert
from torch.utils.data import DataLoader, Subset

from adaptopt import AdaptiveOptimizer

CHECKPOINT = "checkpoint.pt"


def epoch_loader(dataset: TaskDataset, epoch: int) -> DataLoader:
    """This epoch's order, seeded by the epoch (so a resumed run sees the same batches)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch)).tolist()
    return DataLoader(Subset(dataset, order), batch_size=16)


def main(epochs: int = 3, accumulation: int = 2, output_dir: str | None = None, stop_after: int | None = None,
         resume: bool = False) -> dict:
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=not torch.cuda.is_available())
    model = tiny_bert(seed=0).to(accelerator.device)
    dataset = TaskDataset(1024, seed=1)
    opt = AdaptiveOptimizer(model, lr=1e-3, lora_lr=2e-3, rank=8,
                            policy={"method": "automode", "u": 2, "t": 50, "bottom": 0})
    prepared_opt = accelerator.prepare(opt)
    batches = len(accelerator.prepare(epoch_loader(dataset, 0)))
    opt.set_steps_per_epoch(math.ceil(batches / accumulation))  # optimizer steps per epoch, after accumulation
    start = 0
    out = Path(output_dir) if output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume:  # the optimizer first (it rebuilds every layer's mode and rank), then the weights
        saved = torch.load(out / CHECKPOINT, weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        model.load_state_dict(saved["model"])
        torch.set_rng_state(torch.load(out / f"rng.{accelerator.process_index}.pt", weights_only=True))  # dropout
        start = saved["epoch"]
    runner = AdaptiveDDP(model, opt) if accelerator.num_processes > 1 else None
    for epoch in range(start, epochs):
        for batch in accelerator.prepare(epoch_loader(dataset, epoch)):
            net = runner.wrapper if runner is not None else model  # the current wrapper, after any rebuild
            with accelerator.accumulate(net):
                accelerator.backward(net(**batch).loss)
                prepared_opt.step()  # accelerate skips it on accumulation micro-steps
                prepared_opt.zero_grad()
        if stop_after is not None and epoch + 1 == stop_after:
            torch.save(torch.get_rng_state(), out / f"rng.{accelerator.process_index}.pt")  # each rank its own
            if accelerator.is_main_process:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1},
                           out / CHECKPOINT)
            accelerator.wait_for_everyone()
            return {"stopped_after": epoch + 1, "steps": opt.step_count}
    test = TaskDataset(256, seed=2)
    result = {"accuracy": accuracy(model, test.tokens.to(accelerator.device), test.labels.to(accelerator.device)),
              "steps": opt.step_count, "processes": accelerator.num_processes,
              "decisions": sorted({h["step"] for h in opt.history if h["reason"] == "decision"})}
    if accelerator.is_main_process:
        print(opt.summary())
        print(result)
        if out is not None:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "final.pt")
            (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", nargs="?")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    main(output_dir=args.output_dir, stop_after=args.stop_after, resume=args.resume)
