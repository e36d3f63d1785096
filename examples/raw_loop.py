"""A raw PyTorch loop with adaptopt's modules: inject LoRA, train, promote a block to FULL mid-run.

Runs in seconds on CPU with a tiny BERT built from a config (no download):

    python examples/raw_loop.py

It shows the three things the foundation guarantees: injection does not change the
model, ``set_mode`` does not change it either (only what trains), and a promoted layer
really trains its base weight afterwards.
"""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from adaptopt import Mode, inject_adapters


def make_task(n: int, vocab: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentences of random tokens; the label says whether token 1 occurs more often than token 2."""
    tokens = torch.randint(3, vocab, (n, length), generator=generator)
    marks = torch.randint(0, 3, (n, length), generator=generator)
    tokens = torch.where(marks == 0, torch.ones_like(tokens), tokens)
    tokens = torch.where((marks == 1) & (torch.rand(n, length, generator=generator) < 0.8), 2, tokens)
    labels = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
    return tokens, labels


def accuracy(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=tokens).logits.argmax(-1)
    model.train()
    return float((predicted == labels).float().mean())


def main(steps: int = 120, promote_at: int = 60) -> dict[str, float]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    train_x, train_y = make_task(2048, 32, 24, generator)
    test_x, test_y = make_task(512, 32, 24, generator)

    adapters = inject_adapters(model, rank=8, alpha=16)  # query/key/value/dense of both blocks
    for p in model.classifier.parameters():
        p.requires_grad_(True)  # the new task head always trains
    print(f"injected {len(adapters)} adapters; accuracy before training {accuracy(model, test_x, test_y):.3f}")

    def make_optimizer() -> torch.optim.Optimizer:
        # Issue 3's AdaptiveOptimizer keeps one optimizer across transitions; here we rebuild it.
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    optimizer = make_optimizer()
    promoted = [m for name, m in adapters.items() if m.block_index == 1]
    watched = promoted[0].weight
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(train_x), (32,), generator=generator)
        loss = model(input_ids=train_x[batch], labels=train_y[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == promote_at:
            model.eval()
            with torch.no_grad():
                before = model(input_ids=test_x[:64]).logits
                for module in promoted:
                    module.set_mode(Mode.FULL)  # folds s·BA into W; W now trains directly
                change = (model(input_ids=test_x[:64]).logits - before).abs().max().item()
            model.train()
            optimizer = make_optimizer()
            snapshot = watched.detach().clone()
            print(f"step {step}: block 1 → FULL ({len(promoted)} layers); max logit change {change:.1e}")
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  test accuracy {accuracy(model, test_x, test_y):.3f}")
    moved = (watched - snapshot).abs().max().item()
    print(f"promoted base weight moved by {moved:.2e} after promotion (0 would mean a silent no-op)")
    print("modes:", {name: f"{m.mode.value}/r{m.rank}" for name, m in list(adapters.items())[::6]})
    return {"logit_change": change, "moved": moved, "accuracy": accuracy(model, test_x, test_y),
            "majority": float(max(test_y.float().mean(), 1 - test_y.float().mean()))}


if __name__ == "__main__":
    main()
