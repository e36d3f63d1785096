"""Data-parallel training with torchrun: every rank makes the same decisions, and the DDP
wrapper is rebuilt after each transition (AdaptiveDDP), so ranks stay bit-identical.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py [output_dir]

gloo on CPU, NCCL on GPUs. Rank 0 prints the layer table and saves the adapters.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from adaptopt.integrations.ddp import AdaptiveDDP
from synthetic_task import TaskDataset, accuracy, tiny_bert
from torch.utils.data import DataLoader, DistributedSampler

from adaptopt import AdaptiveOptimizer, save_adapters


def main(output_dir: str | None = None, epochs: int = 3) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    model = tiny_bert(seed=0).to(device)
    data = TaskDataset(1024, seed=1)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)
    # 1. the optimizer on the plain model (it injects the adapters), before any wrapper
    opt = AdaptiveOptimizer(model, lr=1e-3, lora_lr=2e-3, rank=8, steps_per_epoch=len(loader),
                            policy={"method": "automode", "u": 2, "t": 50, "bottom": 0})
    # 2. the DDP wrapper that follows the optimizer's transitions
    ddp = AdaptiveDDP(model, opt, device_ids=[device.index] if cuda else None)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (total + 1))  # built once
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = ddp(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            opt.step()  # decisions happen here, at the same step on every rank
            scheduler.step()
            opt.zero_grad(set_to_none=True)
    # every rank holds the same weights: compare a checksum across ranks
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(device)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if rank == 0:
        out = Path(output_dir or tempfile.mkdtemp(prefix="adaptopt-ddp-"))
        test = TaskDataset(256, seed=2)
        result = {"world": world, "ranks_identical": bool(low.item() == high.item()), "rebuilds": ddp.rebuilds,
                  "accuracy": accuracy(model, test.tokens.to(device), test.labels.to(device)),
                  "modes": {n: m.mode.value for n, m in opt.layers.items()}}
        print(opt.summary())
        print(json.dumps({k: v for k, v in result.items() if k != "modes"}))
        save_adapters(model, out / "adapters")
        (out / "result.json").write_text(json.dumps(result))
    ddp.close()  # drop the DDP reducer before the process group (AdaptiveDDP.close says why)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
