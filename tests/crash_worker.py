"""A process that saves in a loop until it is killed (``tests/test_crash_safety.py`` kills it
with SIGKILL at random moments and checks what is left on disk).

``python tests/crash_worker.py KIND FOLDER`` with KIND ``adapters`` (``save_adapters``) or
``merged`` / ``merged-hf`` (``export_merged`` of a plain module / a tiny BERT). It alternates
two saves that compute different functions — A: adapters merged into the weights, B: other
adapters, unmerged — writes their outputs on a fixed input to ``FOLDER/expected.pt`` first,
prints ``ready`` and saves into ``FOLDER/target`` until killed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptopt import export_merged, inject_adapters, save_adapters  # noqa: E402


def plain_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))


def hf_base() -> nn.Module:
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


def probe(kind: str) -> dict:
    if kind == "merged-hf":
        return {"input_ids": torch.arange(12).reshape(2, 6) % 64}
    return {"input": torch.randn(4, 48, generator=torch.Generator().manual_seed(1))}


def outputs(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        if kind == "merged-hf":
            return model(**probe(kind)).logits
        return model(probe(kind)["input"])


def adapted(kind: str, seed: int, merged: bool) -> nn.Module:
    model = hf_base() if kind == "merged-hf" else plain_base()
    layers = inject_adapters(model, targets="auto", rank=4, alpha=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
    if merged:
        for layer in layers.values():
            layer.merge()
    return model


def main() -> None:
    kind, folder = sys.argv[1], Path(sys.argv[2])
    a, b = adapted(kind, 1, merged=True), adapted(kind, 2, merged=False)
    expected = folder / "expected.pt"
    if not expected.exists():
        torch.save({"A": outputs(a, kind), "B": outputs(b, kind)}, folder / "expected.tmp")
        (folder / "expected.tmp").rename(expected)
    print("ready", flush=True)
    save = save_adapters if kind == "adapters" else export_merged
    while True:
        for model in (a, b):
            start = time.perf_counter()
            save(model, folder / "target")
            print(f"saved {time.perf_counter() - start:.6f}", flush=True)  # the test times its kills by this


if __name__ == "__main__":
    main()
