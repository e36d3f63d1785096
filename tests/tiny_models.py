"""Tiny Hugging Face models built from configs (no weights downloaded), for fast tests."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(layers: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 2) -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(layers: int = 2, num_labels: int = 2, dropout: float = 0.1) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_distilbert(layers: int = 2) -> torch.nn.Module:
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=layers, n_heads=2, hidden_dim=32,
                                           max_position_embeddings=64)
    return transformers.DistilBertForSequenceClassification(config).eval()


def token_batch(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
