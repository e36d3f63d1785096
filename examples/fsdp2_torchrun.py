"""AutoMode under FSDP2 (``fully_shard``) with torchrun: base weights sharded over the ranks, LoRA
factors replicated, every transition on the sharded weights, then a checkpoint that any world
size can load.

    torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py [output_dir]

gloo on CPU, NCCL on GPUs. Order matters: adapters first (frozen), then ``fully_shard``, then
the optimizer. Rank 0 writes ``model.safetensors`` (the whole model, through
torch.distributed.checkpoint's ``get_model_state_dict``) and ``optimizer.pt`` (whole Adam
moments); the same files resume a run on any number of ranks.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from synthetic_task import TaskDataset, accuracy, tiny_bert
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from adaptopt import AdaptiveOptimizer, inject_adapters

WHOLE = StateDictOptions(full_state_dict=True)  # every rank gets every tensor whole


def sharded_model(device: torch.device) -> torch.nn.Module:
    model = tiny_bert(seed=0).to(device)
    inject_adapters(model, mode="frozen", rank=8)  # 1. adapters, before sharding
    for block in model.bert.encoder.layer:  # 2. one FSDP unit per block, then the root
        fully_shard(block)
    fully_shard(model)
    return model


def main(output_dir: str | None = None, epochs: int = 2) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    model = sharded_model(device)
    data = TaskDataset(1024, seed=1)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)
    policy = {"method": "automode", "u": 2, "t": 50, "bottom": 0}
    opt = AdaptiveOptimizer(model, lr=1e-3, lora_lr=2e-3, steps_per_epoch=len(loader), policy=policy)  # 3.
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            opt.step()  # decisions at the same step on every rank; folds touch each rank's own rows
            opt.zero_grad(set_to_none=True)

    out = Path(output_dir or tempfile.mkdtemp(prefix="adaptopt-fsdp2-"))
    weights = get_model_state_dict(model, options=WHOLE)  # every rank joins the gathers
    optimizer = opt.state_dict()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
        torch.save(optimizer, out / "optimizer.pt")
    dist.barrier()

    # resume: a fresh sharded model and optimizer take the checkpoint back (modes first, then weights)
    fresh = sharded_model(device)
    fresh_opt = AdaptiveOptimizer(fresh, lr=1e-3, lora_lr=2e-3, steps_per_epoch=len(loader), policy=policy)
    fresh_opt.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
    set_model_state_dict(fresh, load_file(str(out / "model.safetensors")), options=WHOLE)
    reloaded = get_model_state_dict(fresh, options=WHOLE)
    resumed_equal = weights.keys() == reloaded.keys() and all(torch.equal(weights[k], reloaded[k]) for k in weights)

    checksum = torch.stack([t.double().sum() for t in weights.values()]).sum().reshape(1).to(device)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    test = TaskDataset(256, seed=2)
    score = accuracy(model, test.tokens.to(device), test.labels.to(device))  # a collective forward
    if rank == 0:
        result = {"world": world, "ranks_identical": bool(low.item() == high.item()), "resumed_equal": resumed_equal,
                  "accuracy": score, "transitions": sum(h["reason"] == "decision" for h in opt.history),
                  "modes": {n: m.mode.value for n, m in opt.layers.items()}}
        print(json.dumps({k: v for k, v in result.items() if k != "modes"}))
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
