"""Cheap vs exact gradient importance on MiniLM over real Rotten Tomatoes batches.

    .venv/bin/python tests/benchmarks/cheap_scores.py [--model minilm|tiny] [--repeats 7] [--windows 6]

The model is in AutoMode's post-decision modes (one block FULL, five LoRA r=16; with
``--frozen-block`` the last block FROZEN too, so probes run). Printed:

1. step time, interleaved medians in one process: a plain AdamW step over the same trainable
   set, an unscored AdaptiveOptimizer step, a step scored cheaply (``AutoMode(score="cheap")``,
   :mod:`adaptopt.training.gradient_probes`) and one scored exactly (``‖δᵀx‖_F`` per layer). Goal: cheap
   scored ≤ 1.05 × unscored;
   (``--score probed`` measures AutoMode's ``score="probed"`` instead.)
2. AutoMode's amortised overhead over an interval of ``I`` steps with ``w`` scored and one decision:
   ``(w·t_scored + (I − w)·t_unscored + t_decision) / (I · t_plain)``, cheap and exact. Goal ≤ 1.01;
3. Spearman correlation between the cheap and the exact score, per decision window (``w`` real
   batches with both collectors armed; between windows the model trains and the top block by the
   exact score is promoted, as AutoMode would), over layers and over blocks. Goal ≥ 0.9.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleaved_medians  # noqa: E402
from optimizer_overhead import build, plain_adamw  # noqa: E402

from adaptopt import AdaptiveOptimizer, Fixed, Mode  # noqa: E402
from adaptopt.scores.gradient import unit_importance, units  # noqa: E402
from adaptopt.training.layer_stats import StatsCollector  # noqa: E402
from tests.helpers import spearman  # noqa: E402


def real_batches(model_name: str, count: int, batch: int, seq: int, vocab: int) -> list[tuple]:
    """Rotten Tomatoes training snippets, tokenized (``--model tiny``: random tokens)."""
    generator = torch.Generator().manual_seed(0)
    if model_name != "minilm":
        return [(torch.randint(0, vocab, (batch, seq), generator=generator),
                 torch.randint(0, 2, (batch,), generator=generator)) for _ in range(count)]
    from adaptopt.cli.data import load_data
    from adaptopt.cli.models import load_model
    data = load_data({"name": "rotten_tomatoes", "max_train": count * batch})
    tokenizer = load_model({"name": "minilm"}, "base")[1]
    out = []
    for i in range(count):
        texts = data.train_texts[i * batch:(i + 1) * batch]
        enc = tokenizer(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
        out.append((enc["input_ids"], torch.tensor(data.train_labels[i * batch:(i + 1) * batch])))
    return out


def step(model, opt, tokens, labels, collectors=()) -> None:
    model(input_ids=tokens, labels=labels).loss.backward()
    for c in collectors:
        c.observe_step()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(model, opt, batches, collector=None) -> float:
    start = time.perf_counter()
    for tokens, labels in batches:
        if collector is not None:
            collector.arm()
        step(model, opt, tokens, labels, [collector] if collector is not None else [])
    if collector is not None:
        collector.disarm()
        collector.reset()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--window", type=int, default=8, help="scored steps before each decision")
    parser.add_argument("--between", type=int, default=8, help="unscored training steps between windows")
    parser.add_argument("--interval", type=float, default=533 / 6, help="steps between AutoMode decisions")
    parser.add_argument("--frozen-block", action="store_true", help="also freeze the last block (probes run)")
    parser.add_argument("--score", choices=("cheap", "probed"), default="cheap", help="the cheap score to measure")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.model)
    last = len(model.bert.encoder.layer) - 1
    assignment = {r"layer\.0\.": "full", **({rf"layer\.{last}\.": "frozen"} if args.frozen_block else {})}
    opt = AdaptiveOptimizer(model, lr=1e-4, lora_lr=5e-4, rank=16, alpha=32,
                            policy=Fixed(assignment, default=("lora", 16)))
    model.train()
    needed = args.steps + args.windows * (args.window + args.between)
    batches = real_batches(args.model, needed, args.batch, args.seq, model.config.vocab_size)
    cheap = StatsCollector(opt.layers, gradient=args.score, activations=False)
    exact = StatsCollector(opt.layers, gradient="exact", activations=False)
    plain = plain_adamw(model, 1e-4, 5e-4)

    timing = batches[:args.steps]
    measures = {"plain AdamW": functools.partial(timed, model, plain, timing),
                "unscored": functools.partial(timed, model, opt, timing),
                "cheap scored": functools.partial(timed, model, opt, timing, cheap),
                "exact scored": functools.partial(timed, model, opt, timing, exact)}
    for measure in measures.values():
        measure()  # warm-up
    times = interleaved_medians(measures, args.repeats)
    print(f"\n1. step time (batch {args.batch} × seq {args.seq}, medians of {args.repeats} interleaved repeats)")
    for name, t in times.items():
        print(f"   {name:<14} {1000 * t:8.1f} ms   × unscored {t / times['unscored']:.3f}")

    groups = units(opt.views().values(), "block")
    start = time.perf_counter()
    for _ in range(3):
        unit_importance(groups, {n: {"grad_norm": 1.0} for n in opt.layers})
    decision = (time.perf_counter() - start) / 3
    blocks = list(groups)
    a, b = [n for n in opt.layers if ".layer.0." in n], [n for n in opt.layers if ".layer.1." in n]
    start = time.perf_counter()
    opt.apply({**{n: Mode.LORA for n in a}, **{n: Mode.FULL for n in b}})
    opt.apply({**{n: Mode.FULL for n in a}, **{n: Mode.LORA for n in b}})
    decision += (time.perf_counter() - start) / 2
    interval, w = args.interval, args.window
    print(f"\n2. AutoMode amortised over I = {interval:.1f} steps, w = {w} scored, decision {1000 * decision:.0f} ms")
    for kind in ("cheap", "exact"):
        total = w * times[f"{kind} scored"] + (interval - w) * times["unscored"] + decision
        print(f"   {kind:<6} × plain AdamW {total / (interval * times['plain AdamW']):.3f}   "
              f"× unscored {total / (interval * times['unscored']):.3f}")

    print(f"\n3. Spearman(cheap, exact) per decision window ({w} real batches each)")
    layer_rho, block_rho = [], []
    rest = batches[args.steps:]
    for k in range(args.windows):
        window = rest[k * (w + args.between):k * (w + args.between) + w]
        between = rest[k * (w + args.between) + w:(k + 1) * (w + args.between)]
        cheap.reset(window_seed=k)
        cheap.arm()
        exact.arm()
        for tokens, labels in window:
            step(model, opt, tokens, labels, [cheap])
        c, e = cheap.scores(), exact.scores()
        cheap.disarm()
        exact.disarm()
        exact.reset()
        names = list(opt.layers)
        layer_rho.append(spearman([c[n]["grad_norm"] for n in names], [e[n]["grad_norm"] for n in names]))
        cb, eb = unit_importance(groups, c), unit_importance(groups, e)
        block_rho.append(spearman([cb[u] for u in blocks], [eb[u] for u in blocks]))
        top = max(blocks, key=eb.get)
        modes = {n: (Mode.FULL if n.startswith(top + ".") else Mode.LORA) for n in opt.layers}
        if args.frozen_block:
            modes.update({n: Mode.FROZEN for n in opt.layers if f".layer.{last}." in n and not n.startswith(top + ".")})
        opt.apply(modes)
        for tokens, labels in between:
            step(model, opt, tokens, labels)
        print(f"   window {k + 1}: layers {layer_rho[-1]:.3f}, blocks {block_rho[-1]:.3f}, "
              f"exact's top block {top.split('.')[-1]}, cheap's {max(blocks, key=cb.get).split('.')[-1]}")
    print(f"   layers: min {min(layer_rho):.3f}, median {statistics.median(layer_rho):.3f}; "
          f"blocks: min {min(block_rho):.3f}, median {statistics.median(block_rho):.3f}  (goal ≥ 0.9)")


if __name__ == "__main__":
    main()
