"""The HF Trainer's own DDP under torchrun with an adaptive policy (tests/test_hf_trainer.py runs it).

    torchrun --nproc_per_node 2 tests/trainer_ddp_worker.py OUT [--resume]

Trains a tiny Llama 12 steps (AutoMode moves layers between LoRA and FULL), a checkpoint every
6; ``--resume`` continues from the last checkpoint in OUT. Rank 0 writes ``result.json``: whether
the ranks' parameters are identical, the transitions, and a float64 checksum of the parameters.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers
from adaptopt.integrations.hf import AdaptoptCallback

from adaptopt import AdaptiveOptimizer


def main(out: str, resume: bool) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=12, save_steps=6,
                                          report_to=[], use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-2)
    torch.manual_seed(1)  # the data: the Trainer's distributed sampler gives each rank its share
    train = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (96, 16))]
    opt = AdaptiveOptimizer(model, lr=1e-2, rank=2, policy={"method": "automode", "u": 2, "t": 50, "score_steps": 1})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, optimizers=(opt, None),
                                   callbacks=[AdaptoptCallback()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        result = {"ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
                  "transitions": len(opt.history), "checksum": repr(float(flat.sum())), "steps": opt.step_count}
        with open(os.path.join(out, "result.json" if not resume else "resumed.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], "--resume" in sys.argv[2:])
