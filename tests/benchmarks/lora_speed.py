"""LoRA speed and memory: adaptopt's LoRALinear vs full fine-tuning vs PEFT's LoRA, MiniLM.

    .venv/bin/python tests/benchmarks/lora_speed.py [--steps 4] [--repeats 5] [--batch 16 --seq 128]

Same model (all-MiniLM-L6-v2 with a 2-class head), same batches, LoRA r=16, alpha=32, no
adapter dropout, on every linear target (query, key, value, dense); the head trains in every
run. Candidates, one training step each = forward + backward + AdamW step:

- ``full``: every parameter trains;
- ``adaptopt``: ``inject_adapters`` (the fused LoRA node, :mod:`adaptopt.layers.fused_lora`);
- ``adaptopt composite``: the same modules forced onto the unfused path (what fusing buys);
- ``peft``: ``peft.get_peft_model`` with the same rank, alpha, targets (PEFT is only a
  benchmark/test dependency);
- ``frozen floor``: no adapters at all, but gradients flow through every layer — the cost
  any LoRA implementation pays before its first adapter FLOP;
- ``adaptopt qlora``: the same adapters over NF4 (bitsandbytes) bases.

Candidates alternate repeat by repeat (machine noise hits all of them) and ratios of medians
are printed. Memory: each candidate runs 3 steps in a fresh process and reports its peak RSS;
the bytes autograd saves for backward are counted in-process (deterministic).
"""
from __future__ import annotations

import argparse
import copy
import functools
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from interleave import interleaved_medians  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
CANDIDATES = ("full", "adaptopt", "adaptopt composite", "peft", "frozen floor", "adaptopt qlora")


def base_model() -> torch.nn.Module:
    from adaptopt.cli.models import load_model
    torch.manual_seed(0)
    model, _ = load_model({"name": "minilm"}, "classification", 2)
    return model


def build(kind: str, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from adaptopt import find_adapters, inject_adapters
    model = copy.deepcopy(model)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 modules_to_save=["classifier"]))
    elif kind != "full":
        for p in model.parameters():
            p.requires_grad_(False)
        if kind == "frozen floor":
            model.bert.embeddings.LayerNorm.weight.requires_grad_(True)  # gradients must reach every layer
        else:
            inject_adapters(model, TARGETS, rank=16, alpha=32, quantize="nf4" if kind == "adaptopt qlora" else None)
            if kind == "adaptopt composite":
                for module in find_adapters(model).values():
                    module.dropout = torch.nn.Dropout(0.0)  # not Identity: takes the unfused path
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def batches(count: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(1000, 30000, (batch, seq), generator=generator),
             torch.randint(0, 2, (batch,), generator=generator)) for _ in range(count)]


def train_steps(model, opt, data) -> float:
    start = time.perf_counter()
    for tokens, labels in data:
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(data)


def saved_bytes(model, data) -> int:
    """Bytes of distinct tensors autograd keeps for one backward pass."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    tokens, labels = data[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=tokens, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def peak_rss_child(kind: str, batch: int, seq: int) -> float:
    from adaptopt.cli.runner import peak_rss_mb
    model, opt = build(kind, base_model())
    train_steps(model, opt, batches(3, batch, seq))
    return peak_rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--memory-only", action="store_true", help="skip the timing (peak RSS and saved bytes only)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kinds = args.candidates.split(",")
    source = base_model()
    runs = {kind: build(kind, source) for kind in kinds}
    data = batches(args.steps, args.batch, args.seq)
    for model, opt in runs.values():
        train_steps(model, opt, data[:1])  # warm-up
    median = interleaved_medians({kind: functools.partial(train_steps, model, opt, data)
                                  for kind, (model, opt) in runs.items()}, 0 if args.memory_only else args.repeats)
    saved = {kind: saved_bytes(model, data) for kind, (model, _) in runs.items()}
    context = multiprocessing.get_context("spawn")
    rss = {}
    for kind in kinds:
        with context.Pool(1) as pool:
            rss[kind] = pool.apply(peak_rss_child, (kind, args.batch, args.seq))
    print(f"MiniLM-L6, batch {args.batch} x seq {args.seq}, LoRA r=16 alpha=32 on {TARGETS}, "
          f"{args.steps} steps x {args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    print(f"{'candidate':<20} {'step (ms)':>9} {'/ full':>7} {'/ peft':>7} {'saved for bwd (MB)':>19} "
          f"{'peak RSS (MB)':>14}")
    for kind in kinds:
        vs_peft = f"{median[kind] / median['peft']:7.3f}" if "peft" in median else "      –"
        vs_full = f"{median[kind] / median['full']:7.3f}" if "full" in median else "      –"
        print(f"{kind:<20} {median[kind] * 1e3:9.0f} {vs_full} {vs_peft} {saved[kind] / 2**20:19.1f} "
              f"{rss[kind]:14.0f}")


if __name__ == "__main__":
    main()
