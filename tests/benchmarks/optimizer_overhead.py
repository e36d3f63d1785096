"""Step-time overhead of AdaptiveOptimizer vs the same modules + plain ``torch.optim.AdamW``.

    .venv/bin/python tests/benchmarks/optimizer_overhead.py [--model minilm|tiny] [--steps 4] [--repeats 7]

Two comparisons on MiniLM-L6 (batch 16 × seq 128; ``--model tiny``: a BERT from a config, offline
and quick). Plain and ours use identical models (same seed, same injected adapters) and the
same batches; they alternate repeat by repeat and ratios of medians are printed.

1. Static all-LoRA (r=16): ``AdaptiveOptimizer(policy="lora")`` vs AdamW over the same factors
   and head. Target ≤ 1.02.
2. AutoMode (u=6, t=10) amortised over an epoch: the modes it runs in after a decision (one
   block FULL, five LoRA) measured three ways — a plain AdamW step, an unscored AdaptiveOptimizer
   step, a scored step (hooks armed) — plus the cost of a decision (the scores read out and one
   block moved FULL → LoRA while another moves LoRA → FULL). Over an interval of ``I`` steps
   (an epoch of Rotten Tomatoes at batch 16 is 533 steps, ``I = 533/6``) with ``w = 8`` scored:

   ``amortised = (w·t_scored + (I − w)·t_unscored + t_decision) / (I · t_plain)``. Target ≤ 1.05.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from interleave import interleaved_medians  # noqa: E402

from adaptopt import AdaptiveOptimizer, Mode, find_adapters  # noqa: E402


def build(model_name: str, hidden: int = 128, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_name == "minilm":
        from adaptopt.cli.models import load_model
        return load_model({"name": "minilm"}, "classification", 2)[0]
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config)


def plain_adamw(model: torch.nn.Module, lr: float, lora_lr: float) -> torch.optim.AdamW:
    """AdamW over what trains in ``model``: factors at ``lora_lr``, everything else at ``lr``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    factors = {id(p) for m in find_adapters(model).values() for p in (m.lora_A, m.lora_B) if p is not None}
    return torch.optim.AdamW([{"params": [p for p in trainable if id(p) in factors], "lr": lora_lr},
                              {"params": [p for p in trainable if id(p) not in factors], "lr": lr}], foreach=True)


def timed_steps(model, opt, batches, arm=None) -> float:
    start = time.perf_counter()
    for tokens, labels in batches:
        if arm is not None:
            arm.arm()
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if arm is not None:
        arm.disarm()
        arm.reset()
    return (time.perf_counter() - start) / len(batches)


def interleaved(runs: dict, batches, repeats: int) -> dict[str, float]:
    """Median seconds per step of each ``name: (model, opt, collector-or-None)``, interleaved."""
    for model, opt, arm in runs.values():
        timed_steps(model, opt, batches[:1], arm)  # warm-up
    return interleaved_medians({name: functools.partial(timed_steps, model, opt, batches, arm)
                                for name, (model, opt, arm) in runs.items()}, repeats)


def block_of(name: str) -> str:
    return name.split(".")[3]  # bert.encoder.layer.<i>.…


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--interval", type=float, default=533 / 6, help="steps between AutoMode decisions")
    parser.add_argument("--window", type=int, default=8, help="scored steps before each decision")
    args = parser.parse_args()
    lr, lora_lr = 1e-4, 5e-4
    source = build(args.model)
    vocab = source.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab, (args.batch, args.seq), generator=generator),
                torch.randint(0, 2, (args.batch,), generator=generator)) for _ in range(args.steps)]

    # 1. static all-LoRA
    ours_model = copy.deepcopy(source)
    ours = AdaptiveOptimizer(ours_model, lr=lr, lora_lr=lora_lr, policy="lora", rank=16, alpha=32)
    plain_model = copy.deepcopy(ours_model)
    static = interleaved({"plain": (plain_model, plain_adamw(plain_model, lr, lora_lr), None),
                          "ours": (ours_model, ours, None)}, batches, args.repeats)

    # 2. AutoMode's post-decision modes: one block FULL (a middle one), the rest LoRA
    auto_model = copy.deepcopy(source)
    auto = AdaptiveOptimizer(auto_model, lr=lr, lora_lr=lora_lr, policy="lora", rank=16, alpha=32)
    blocks = list(dict.fromkeys(block_of(n) for n in auto.layers))
    full_block, other_block = blocks[len(blocks) // 2], blocks[0]
    auto.apply({n: Mode.FULL for n in auto.layers if block_of(n) == full_block})
    plain_auto_model = copy.deepcopy(auto_model)
    steps = interleaved({"plain": (plain_auto_model, plain_adamw(plain_auto_model, lr, lora_lr), None),
                         "unscored": (auto_model, auto, None),
                         "scored": (auto_model, auto, auto.collector)}, batches, args.repeats)
    decision_times = []
    for i in range(args.repeats):
        timed_steps(auto_model, auto, batches[:1], None)
        auto.collector.arm()
        auto_model(input_ids=batches[0][0], labels=batches[0][1]).loss.backward()
        auto.zero_grad(set_to_none=True)
        auto.collector.disarm()
        start = time.perf_counter()
        auto.collector.scores()
        a, b = (full_block, other_block) if i % 2 == 0 else (other_block, full_block)
        auto.apply({n: (Mode.LORA if block_of(n) == a else Mode.FULL) for n in auto.layers if block_of(n) in (a, b)})
        decision_times.append(time.perf_counter() - start)
        auto.collector.reset()
    decision = statistics.median(decision_times)
    interval, window = args.interval, args.window
    amortised = (window * steps["scored"] + (interval - window) * steps["unscored"] + decision) / (
        interval * steps["plain"])

    print(f"{args.model}, batch {args.batch} x seq {args.seq}, LoRA r=16, {args.steps} steps x {args.repeats} "
          f"interleaved repeats, {torch.get_num_threads()} threads")
    print(f"1. static all-LoRA: plain AdamW {static['plain'] * 1e3:.0f} ms, AdaptiveOptimizer "
          f"{static['ours'] * 1e3:.0f} ms per step -> ratio {static['ours'] / static['plain']:.3f} (target <= 1.02)")
    print(f"2. AutoMode modes (block {full_block} FULL, rest LoRA): plain {steps['plain'] * 1e3:.0f} ms, "
          f"unscored {steps['unscored'] * 1e3:.0f} ms ({steps['unscored'] / steps['plain']:.3f}), scored "
          f"{steps['scored'] * 1e3:.0f} ms ({steps['scored'] / steps['plain']:.3f}), decision {decision * 1e3:.0f} ms")
    print(f"   amortised over {interval:.1f} steps per decision, {window} scored: {amortised:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
