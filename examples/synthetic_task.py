"""A task every example can train on in seconds, offline: a tiny BERT from a config and
sentences whose label says whether token 1 occurs more often than token 2."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB, LENGTH = 32, 24


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def make_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sentences of random tokens with planted 1s and 2s, and their labels."""
    tokens = torch.randint(3, VOCAB, (n, LENGTH), generator=generator)
    marks = torch.randint(0, 3, (n, LENGTH), generator=generator)
    tokens = torch.where(marks == 0, torch.ones_like(tokens), tokens)
    tokens = torch.where((marks == 1) & (torch.rand(n, LENGTH, generator=generator) < 0.8), 2, tokens)
    labels = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
    return tokens, labels


class TaskDataset(torch.utils.data.Dataset):
    """The task as ``{"input_ids", "labels"}`` rows (what the HF Trainer and DataLoaders expect)."""

    def __init__(self, n: int, seed: int) -> None:
        self.tokens, self.labels = make_task(n, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.labels[i]}


def accuracy(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=tokens).logits.argmax(-1)
    model.train(was_training)
    return float((predicted == labels).float().mean())
