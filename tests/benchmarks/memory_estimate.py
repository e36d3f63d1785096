"""The memory estimate against measured peaks: each policy trains in a fresh process, whose peak
resident memory above its baseline (torch and transformers imported, nothing built) is compared
with ``estimate_memory`` for the same model, batch and sequence length.

    .venv/bin/python tests/benchmarks/memory_estimate.py            (~15 min; one process at a time)
    .venv/bin/python tests/benchmarks/memory_estimate.py --quick    (SmolLM2, three policies)
    .venv/bin/python tests/benchmarks/memory_estimate.py --device cuda --dtype bfloat16   (scripts/gpu_check.sh)

Each worker runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (see ``ALLOCATOR``). Models are built
from their configs with random weights (the sizes are what matter, and a
``from_pretrained`` would add the file's mapped pages to the resident set): SmolLM2-135M and an
~80M-linear Llama (hidden 768, MLP 2048, 12 blocks: 85M parameters in linear layers). Each run
takes enough steps to reach the policy's largest assignment (Hybrid decides after 2 steps,
AutoMode at every step of 4-step epochs, LISA and BAdam from the first) and one more, so AdamW's
moments exist for it. Written: ``memory_estimate.json`` and ``memory_estimate.png`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

POLICIES = {"full": "full", "lora": "lora", "qlora": "qlora",
            "hybrid": {"method": "hybrid", "calibration_steps": 2, "freeze_prefix": 0},
            "automode": {"method": "automode", "u": 4}, "lisa": {"method": "lisa", "gamma": 2},
            # a pass of BAdam peaks when its lowest block trains (every block above saves activations):
            # ascending order reaches that block in the few steps measured
            "badam": {"method": "badam", "order": "ascending"}}
STEPS = 4
# glibc keeps freed heap memory in the process (its resident set then counts dead tensors, +30% on
# SmolLM2's LoRA step); with every block of 64 KiB or more mapped and unmapped directly, the resident
# peak is the peak of live tensors — what the estimate predicts, and what max_memory_allocated is on CUDA
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}
LLAMA_80M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True)


def build(model_name: str):
    import torch
    import transformers
    if model_name == "smollm2-135m":
        from adaptopt.cli.models import model_directory
        config = transformers.AutoConfig.from_pretrained(model_directory({"name": "smollm2-135m"}))
    else:
        config = transformers.LlamaConfig(**LLAMA_80M)
    config._attn_implementation = "eager"  # what the estimate traces (sdpa on CPU keeps no less)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def peak_rss() -> int:
    """The process's peak resident set since the last :func:`reset_peak_rss` (``VmHWM``), bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024


def reset_peak_rss() -> None:
    """Linux: the peak resident set restarts from the current one (``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(model_name: str, policy_name: str, batch: int, seq: int, device: str = "cpu",
           dtype_name: str = "float32", budget: str | None = None, autocast: str | None = None) -> dict:
    """One policy's run in this (fresh) process: measured peak and the estimate's parts, bytes. On
    CUDA the peak is ``torch.cuda.max_memory_allocated`` (live tensors, no process or context)."""
    import torch
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    if policy_name == "qlora":
        import bitsandbytes  # noqa: F401  (its libraries are the process's, not training's: ~90 MB)
    baseline = peak_rss()
    from adaptopt import AdaptiveOptimizer, MemoryBudget, estimate_memory
    policy = POLICIES[policy_name]
    limit = MemoryBudget(budget, batch, seq) if budget else None
    with torch.device("meta"):
        meta = build(model_name)
    amp = getattr(torch, autocast) if autocast else None
    estimate = estimate_memory(meta, policy, batch, seq, rank=16, alpha=32, dtype=dtype, memory_budget=limit,
                               autocast=amp, trainable=("classifier", "score") if policy_name != "full" else ())
    baseline = max(baseline, peak_rss())
    model = build(model_name).to(device=device, dtype=dtype).train()
    opt = AdaptiveOptimizer(model, lr=1e-5, policy=policy, rank=16, alpha=32, steps_per_epoch=STEPS,
                            train_other=policy_name == "full", memory_budget=limit)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    reset_peak_rss()  # training's peak, not building's (a 4-bit base is built at 32 bits here, then quantized)
    for _ in range(STEPS + 1):
        with torch.autocast(device_type=device, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    if device == "cuda":
        peak, baseline = torch.cuda.max_memory_allocated(), 0
    else:
        peak = peak_rss()
    modes = {m: sum(layer.mode.value == m for layer in opt.layers.values()) for m in ("full", "lora", "frozen")}
    return {"model": model_name, "policy": policy_name, "measured": peak - baseline, "baseline": baseline,
            "estimate": estimate.total, "parts": estimate.row(), "trained": opt.trainable_parameter_count(),
            "estimated_trained": estimate.trained_elements, "modes_end": modes,
            "budget": opt.memory_budget.limit if limit else None}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["measured"] / 1e9 for r in mine], 0.4, label="measured peak RSS − baseline")
        ax.bar([x + 0.2 for x in xs], [r["estimate"] / 1e9 for r in mine], 0.4, label="estimate_memory")
        ax.set_xticks(list(xs), [r["policy"] for r in mine])
        ax.set_ylabel("GB")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "POLICY"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--autocast", choices=("bfloat16", "float16"), help="train under torch.autocast to this dtype "
                   "(weights stay --dtype), and estimate the same")
    p.add_argument("--budget", help="a memory budget for the policies that spend one ('lora+25%%'): each trains "
                   "within it, and the table adds the budget and measured / budget")
    p.add_argument("--out", default=str(ROOT / "results" / "memory_estimate"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.seq, args.device, args.dtype, args.budget,
                                args.autocast)))
        return
    models = ["smollm2-135m"] if args.quick else ["smollm2-135m", "llama-80m"]
    policies = ["lora", "hybrid", "full"] if args.quick else list(POLICIES)
    if args.budget:
        policies = ["hybrid", "automode", "lisa", "badam"]
    rows: list[dict] = []
    refused: list[dict] = []
    from tqdm import tqdm
    for model_name in models:
        for policy in tqdm(policies, desc=model_name):
            out = subprocess.run([sys.executable, __file__, "--worker", model_name, policy, "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--device", args.device, "--dtype", args.dtype,
                                  *(["--budget", args.budget] if args.budget else []),
                                  *(["--autocast", args.autocast] if args.autocast else [])],
                                 capture_output=True, text=True, env={**os.environ, **ALLOCATOR})
            if out.returncode:  # a refusal (a budget that fits nothing) is a result; anything else is not
                last = out.stderr.strip().splitlines()[-1]
                if not last.startswith("ValueError"):
                    raise RuntimeError(out.stderr)
                refused.append({"model": model_name, "policy": policy, "refused": last})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory_estimate.json").write_text(json.dumps(rows + refused, indent=1))
    plot(rows, out_dir / "memory_estimate.png")
    measured = ("torch.cuda.max_memory_allocated" if args.device == "cuda"
                else f"peak RSS − the process's baseline, {ALLOCATOR}")
    amp = f", autocast to {args.autocast}" if args.autocast else ""
    print(f"batch {args.batch} × {args.seq} tokens, {args.dtype}{amp} on {args.device}, LoRA rank 16 (GB; measured = "
          f"{measured})")
    print("| model | policy | measured | estimate | estimate / measured | weights | grads | optimizer | activations "
          "| logits | budget | measured / budget | modes at the end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["parts"]
        budget = (f"{r['budget'] / 1e9:.3f} | {r['measured'] / r['budget']:.2f}" if r.get("budget")
                  else "– | –")
        modes = " · ".join(f"{k} {v}" for k, v in r["modes_end"].items() if v)
        print(f"| {r['model']} | {r['policy']} | {r['measured'] / 1e9:.3f} | {r['estimate'] / 1e9:.3f} | "
              f"{r['estimate'] / r['measured']:.2f} | {q['weights']:.3f} | {q['gradients']:.3f} | "
              f"{q['optimizer']:.3f} | {q['activations']:.3f} | {q['logits']:.3f} | {budget} | {modes} |")
    for r in refused:
        print(f"| {r['model']} | {r['policy']} | refused: {r['refused']} |")


if __name__ == "__main__":
    main()
