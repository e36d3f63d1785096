"""QLoRA against our LoRA: peak memory (fresh process per candidate) and step time (interleaved).

    .venv/bin/python tests/benchmarks/qlora_memory.py [--models minilm,smollm2-135m] [--repeats 5]

Same model, same batches, LoRA r=16, alpha=32 on every "auto" target, AdamW on the factors;
``qlora`` puts NF4 (bitsandbytes) bases under the same adapters, so its LoRA layers run through
the fused 4-bit node (adaptopt/layers/fused_quant_lora.py). Memory: each candidate trains 3 steps in a fresh
process and reports its peak RSS (VmHWM). Every process imports bitsandbytes first, as every
process that imports transformers' Trainer does (the import alone costs ~0.1 GB of RSS here,
printed below), so the comparison is of training, not of imports. Time: both candidates in
one process, steps alternating repeat by repeat, ratio of medians.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from interleave import interleaved_medians  # noqa: E402

SHAPES = {"minilm": (16, 128), "smollm2-135m": (4, 128)}  # batch, sequence


def build(model_name: str, kind: str):
    from adaptopt import inject_adapters
    from adaptopt.cli.models import load_model
    torch.manual_seed(0)
    task = "classification" if model_name == "minilm" else "causal_lm"
    model, _ = load_model({"name": model_name}, task, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = inject_adapters(model, rank=16, alpha=32, quantize="nf4" if kind == "qlora" else None)
    model.train()
    params = [p for m in layers.values() for p in (m.lora_A, m.lora_B)]
    return model, torch.optim.AdamW(params, lr=1e-4)


def batches(model_name: str, count: int):
    batch, seq = SHAPES[model_name]
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(1000, 30000, (batch, seq), generator=generator)
        labels = torch.randint(0, 2, (batch,), generator=generator) if model_name == "minilm" else tokens
        out.append((tokens, labels))
    return out


def train_steps(model, opt, data) -> float:
    start = time.perf_counter()
    for tokens, labels in data:
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(data)


def peak_child(model_name: str, kind: str) -> tuple[float, float]:
    import adaptopt  # noqa: F401  (first, as in any adaptopt process: it quiets bitsandbytes' kernel notices)
    from adaptopt.cli.runner import peak_rss_mb
    start = peak_rss_mb()
    import bitsandbytes  # noqa: F401  (what a Trainer process has imported anyway)
    imported = peak_rss_mb()
    model, opt = build(model_name, kind)
    train_steps(model, opt, batches(model_name, 3))
    return peak_rss_mb(), imported - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(f"{torch.get_num_threads()} threads; LoRA r=16 alpha=32 on every auto target; peak RSS of 3 steps "
          "in a fresh process; step time interleaved medians")
    print(f"{'model':<14} {'lora peak (MB)':>15} {'qlora peak (MB)':>16} {'qlora / lora':>13} "
          f"{'bnb import (MB)':>16} {'lora step (ms)':>15} {'qlora step (ms)':>16} {'time ratio':>11}")
    for name in args.models.split(","):
        peaks = {}
        for kind in ("lora", "qlora"):
            with context.Pool(1) as pool:
                peaks[kind] = pool.apply(peak_child, (name, kind))
        runs = {kind: build(name, kind) for kind in ("lora", "qlora")}
        data = batches(name, args.steps)
        for model, opt in runs.values():
            train_steps(model, opt, data[:1])  # warm-up
        median = interleaved_medians({kind: functools.partial(train_steps, model, opt, data)
                                      for kind, (model, opt) in runs.items()}, args.repeats)
        del runs
        print(f"{name:<14} {peaks['lora'][0]:15.0f} {peaks['qlora'][0]:16.0f} "
              f"{peaks['qlora'][0] / peaks['lora'][0]:13.3f} {peaks['qlora'][1]:16.0f} "
              f"{median['lora'] * 1e3:15.0f} {median['qlora'] * 1e3:16.0f} {median['qlora'] / median['lora']:11.3f}")


if __name__ == "__main__":
    main()
