"""Extra cost of a gradient-importance scoring step (statistics hooks armed) vs a plain step.

    .venv/bin/python tests/benchmarks/scoring_cost.py [--steps 10] [--repeats 7] [--hidden 128 --seq 64]

Same model (all-LoRA r=8, tiny BERT from a config), same batches; armed and unarmed runs
alternate repeat by repeat and the ratio of medians is printed, with what it amortises to
for AutoMode's default window (8 scored steps per decision) at u=6 decisions per epoch of
Rotten Tomatoes at batch 16 (533 steps).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaptopt import AdaptiveOptimizer
from optimizer_overhead import build


def timed_steps(model, opt, batches, armed: bool) -> float:
    start = time.perf_counter()
    for tokens, labels in batches:
        if armed:
            opt.collector.arm()
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()  # the static policy disarms after the step
        opt.zero_grad(set_to_none=True)
    opt.collector.reset()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--window", type=int, default=8, help="AutoMode score_steps")
    parser.add_argument("--interval", type=int, default=533 // 6, help="steps between AutoMode decisions")
    args = parser.parse_args()

    model = build(args.hidden, args.layers)
    opt = AdaptiveOptimizer(model, lr=1e-4, policy="lora", rank=8, alpha=16)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 1000, (args.batch, args.seq), generator=generator),
                torch.randint(0, 2, (args.batch,), generator=generator)) for _ in range(args.steps)]
    timed_steps(model, opt, batches[:3], True), timed_steps(model, opt, batches[:3], False)  # warm-up
    armed, plain = [], []
    for _ in range(args.repeats):
        armed.append(timed_steps(model, opt, batches, True))
        plain.append(timed_steps(model, opt, batches, False))
    ratio = statistics.median(armed) / statistics.median(plain)
    share = min(args.window, args.interval) / args.interval
    print(f"scored step {1e3 * statistics.median(armed):.2f} ms / plain step {1e3 * statistics.median(plain):.2f} ms"
          f" = {ratio:.3f}  (BERT h={args.hidden} x{args.layers}, batch {args.batch}x{args.seq}, all-LoRA r=8)")
    print(f"amortised over an AutoMode interval ({args.window} scored of {args.interval} steps): "
          f"{1 + (ratio - 1) * share:.3f}")


if __name__ == "__main__":
    main()
