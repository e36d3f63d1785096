"""On a GPU: step time and peak device memory of full fine-tuning, our LoRA and QLoRA, SmolLM2-135M.

    .venv/bin/python tests/benchmarks/gpu_step_time.py [--batch 8 --seq 256 --repeats 5 --dtype bfloat16]

One process; the candidates alternate repeat by repeat (interleaved medians, CUDA synchronised);
peak memory is ``torch.cuda.max_memory_allocated`` over each candidate's own steps. Prints the
ratios LoRA / full and QLoRA / LoRA. Exits with a message (status 2) on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from interleave import interleaved_medians  # noqa: E402

CANDIDATES = ("full", "lora", "qlora")


def build(kind: str, dtype: torch.dtype):
    from adaptopt import AdaptiveOptimizer
    from adaptopt.cli.models import load_model
    torch.manual_seed(0)
    model, _ = load_model({"name": "smollm2-135m"}, "causal_lm")
    model = model.to("cuda", dtype).train()
    policy = {"full": "full", "lora": "lora", "qlora": {"method": "qlora", "quantize": {"quant_type": "nf4",
                                                                                       "compute_dtype": dtype}}}[kind]
    return model, AdaptiveOptimizer(model, lr=1e-4, policy=policy, rank=16, alpha=32)


def steps(model, opt, data) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step_time: no CUDA device here; run it on a GPU machine (scripts/gpu_check.sh)")
        return 2
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 49152, (args.batch, args.seq), generator=generator).cuda() for _ in range(args.steps)]
    runs = {kind: build(kind, dtype) for kind in CANDIDATES}
    peaks = {}
    for kind, (model, opt) in runs.items():
        steps(model, opt, data[:1])  # warm-up
        torch.cuda.reset_peak_memory_stats()
        steps(model, opt, data)
        peaks[kind] = torch.cuda.max_memory_allocated() / 2**20
    median = interleaved_medians({k: functools.partial(steps, m, o, data) for k, (m, o) in runs.items()},
                                 args.repeats)
    print(f"{torch.cuda.get_device_name()}, SmolLM2-135M {args.dtype}, batch {args.batch} x seq {args.seq}, "
          f"LoRA r=16 on every auto target, {args.repeats} interleaved repeats")
    for kind in CANDIDATES:
        print(f"{kind:<6} step {median[kind] * 1e3:8.1f} ms   peak allocated {peaks[kind]:8.0f} MB")
    print(f"LoRA / full step time {median['lora'] / median['full']:.3f}; QLoRA / LoRA step time "
          f"{median['qlora'] / median['lora']:.3f}; QLoRA / LoRA peak memory {peaks['qlora'] / peaks['lora']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
