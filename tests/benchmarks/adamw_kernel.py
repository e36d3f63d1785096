"""AdamW's update of the FULL blocks the default trains, by kernel: ``fused`` (the optimizer's default
where torch has the kernel), ``foreach`` (its default before) and the per-tensor loop; the median time
of one ``step()`` and its ratio to ``foreach``'s. The update is memory-bound (it reads and writes the
weight, its gradient and two moments per element), so its FLOPs do not show it
(``estimate_compute`` counts matrix products only).

    .venv/bin/python tests/benchmarks/adamw_kernel.py                 (~1 min on 2 CPU cores)
    .venv/bin/python tests/benchmarks/adamw_kernel.py --device cuda   (scripts/gpu_check.sh)

The parameters are those of MiniLM's top 2 blocks and SmolLM2-135M's top 10 (as many as the default
chose on the suite: docs/policies.md), built from their configs with random weights and gradients.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BLOCKS = {"minilm": 2, "smollm2-135m": 10}  # FULL blocks the default chose on each model
KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def full_block_parameters(name: str, blocks: int, device: str) -> list[torch.Tensor]:
    """The parameters of the model's top ``blocks`` blocks, each with a random gradient."""
    from transformers import AutoConfig, AutoModel

    from adaptopt.cli.models import model_directory
    from adaptopt.surgery.inject import TargetInfo
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(model_directory({"name": name})))
    named = [(TargetInfo.from_name(n).block_index, p) for n, p in model.named_parameters()]
    top = sorted({i for i, _ in named if i is not None})[-blocks:]
    params = [torch.nn.Parameter(p.detach().to(device)) for i, p in named if i in top]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def step_time(params: list[torch.Tensor], kernel: dict, repeats: int, device: str) -> float:
    """Median seconds of one AdamW step over ``params`` with ``kernel`` (after 3 warm-up steps)."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kernel)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 3):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default=",".join(BLOCKS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("adamw_kernel: no CUDA device here; run it on a GPU machine (scripts/gpu_check.sh)")
        return 2
    print(f"AdamW step over the FULL blocks, {args.device}, median of {args.repeats}; ratio to foreach")
    print("| model | elements | fused ms | foreach ms | loop ms | fused / foreach |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        params = full_block_parameters(name, BLOCKS[name], args.device)
        ms = {k: 1e3 * step_time(params, kernel, args.repeats, args.device) for k, kernel in KERNELS.items()}
        print(f"| {name} (top {BLOCKS[name]} blocks) | {sum(p.numel() for p in params) / 1e6:.2f}M | "
              f"{ms['fused']:.2f} | {ms['foreach']:.2f} | {ms['loop']:.2f} | {ms['fused'] / ms['foreach']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
