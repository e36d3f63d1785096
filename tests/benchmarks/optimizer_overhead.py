"""Step-time overhead of AdaptiveOptimizer (static all-LoRA) vs the same LoRA modules + plain AdamW.

    .venv/bin/python tests/benchmarks/optimizer_overhead.py [--steps 20] [--repeats 7]

Both runs use identical models (same seed, same injected adapters) and the same batches;
they alternate repeat by repeat (machine noise hits both) and the ratio of medians is
printed. A tiny BERT from a config keeps it offline and quick.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from adaptopt import AdaptiveOptimizer, find_adapters


def build(hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config)


def timed_steps(model, opt, batches) -> float:
    start = time.perf_counter()
    for tokens, labels in batches:
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    ours_model = build(args.hidden, args.layers)
    ours = AdaptiveOptimizer(ours_model, lr=1e-4, policy="lora", rank=8, alpha=16)
    plain_model = copy.deepcopy(ours_model)
    trainable = [p for p in plain_model.parameters() if p.requires_grad]
    factors = {id(p) for m in find_adapters(plain_model).values() for p in (m.lora_A, m.lora_B)}
    plain = torch.optim.AdamW([{"params": [p for p in trainable if id(p) in factors], "lr": 1e-3},
                               {"params": [p for p in trainable if id(p) not in factors], "lr": 1e-4}], foreach=True)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 1000, (args.batch, args.seq), generator=generator),
                torch.randint(0, 2, (args.batch,), generator=generator)) for _ in range(args.steps)]
    timed_steps(ours_model, ours, batches[:3]), timed_steps(plain_model, plain, batches[:3])  # warm-up
    ours_times, plain_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed_steps(plain_model, plain, batches))
        ours_times.append(timed_steps(ours_model, ours, batches))
    ratio = statistics.median(ours_times) / statistics.median(plain_times)
    print(f"BERT hidden={args.hidden} layers={args.layers} batch={args.batch}x{args.seq}, all-LoRA r=8, "
          f"{args.steps} steps x {args.repeats} interleaved repeats")
    print(f"  plain AdamW        median step {statistics.median(plain_times) * 1e3:8.2f} ms")
    print(f"  AdaptiveOptimizer  median step {statistics.median(ours_times) * 1e3:8.2f} ms")
    print(f"  ratio ours/plain = {ratio:.3f}")


if __name__ == "__main__":
    main()
