"""A raw PyTorch loop with AdaptiveOptimizer: LoRA everywhere, then one block promoted to FULL mid-run.

Runs in seconds on CPU with a tiny BERT built from a config (no download):

    python examples/raw_loop.py

It shows what the optimizer guarantees: a transition does not change the model (only
what trains), the same optimizer and scheduler carry on across it, and a promoted layer
really trains its base weight afterwards.
"""
from __future__ import annotations

import torch
from synthetic_task import accuracy, make_task, tiny_bert

from adaptopt import AdaptiveOptimizer, Mode


def main(steps: int = 120, promote_at: int = 60) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    model = tiny_bert(seed=0)
    train_x, train_y = make_task(2048, generator)
    test_x, test_y = make_task(512, generator)

    # injects LoRA (r=8) into query/key/value/dense; the classifier head trains by default
    optimizer = AdaptiveOptimizer(model, lr=2e-3, lora_lr=2e-3, policy="lora", rank=8, alpha=16)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (steps + 1))  # built once
    adapters = optimizer.layers
    print(f"injected {len(adapters)} adapters; accuracy before training {accuracy(model, test_x, test_y):.3f}")
    promoted = [name for name, m in adapters.items() if m.block_index == 1]
    watched = adapters[promoted[0]].weight
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(train_x), (32,), generator=generator)
        loss = model(input_ids=train_x[batch], labels=train_y[batch]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == promote_at:
            model.eval()
            with torch.no_grad():
                before = model(input_ids=test_x[:64]).logits
                optimizer.apply({name: Mode.FULL for name in promoted})  # folds s·BA into W; W trains now
                change = (model(input_ids=test_x[:64]).logits - before).abs().max().item()
            model.train()
            snapshot = watched.detach().clone()
            print(f"step {step}: block 1 → FULL ({len(promoted)} layers); max logit change {change:.1e}")
            print(optimizer.summary())
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  test accuracy {accuracy(model, test_x, test_y):.3f}")
    moved = (watched - snapshot).abs().max().item()
    print(f"promoted base weight moved by {moved:.2e} after promotion (0 would mean a silent no-op)")
    print("modes:", {name: f"{m.mode.value}/r{m.rank}" for name, m in list(adapters.items())[::6]})
    return {"logit_change": change, "moved": moved, "accuracy": accuracy(model, test_x, test_y),
            "majority": float(max(test_y.float().mean(), 1 - test_y.float().mean()))}


if __name__ == "__main__":
    main()
