"""The compute estimate against measured training time: each policy trains a short run (the real
optimizer; Hybrid with the Trainer callback's scoring pass), the policies in turn within every
repeat; the median run time over LoRA's is set beside ``estimate_compute``'s FLOPs per step over
LoRA's for the same model, batch and run length.

    .venv/bin/python tests/benchmarks/compute_estimate.py                  (~10 min on 2 CPU cores)
    .venv/bin/python tests/benchmarks/compute_estimate.py --quick          (MiniLM only, ~3 min)
    .venv/bin/python tests/benchmarks/compute_estimate.py --real --models smollm2-135m --policies lora,hybrid
                                                          (pretrained weights and the suite's chitchat texts)
    .venv/bin/python tests/benchmarks/compute_estimate.py --device cuda --dtype bfloat16 --batch 8 --seq 512
                                                                           (scripts/gpu_check.sh)

Models are built from their configs with random weights and fed random tokens (the shapes are what
FLOPs see): MiniLM as a two-class classifier and SmolLM2-135M as a language model; ``--real`` loads
their pretrained weights and feeds the suite's texts instead (rotten_tomatoes, chitchat), padded per
batch with their attention mask. Written: ``compute_estimate.json`` and
``compute_estimate.png`` (estimated against measured, one point per policy and model) in ``--out``.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleaved_medians  # noqa: E402

POLICIES = {"lora": "lora", "full": "full", "hybrid": {"method": "hybrid"},
            "hybrid f0": {"method": "hybrid", "freeze_at": None},  # the prefix frozen at the decision
            "lisa": {"method": "lisa", "gamma": 2, "period": 4}, "badam": {"method": "badam", "period": 4}}
MODELS = {"minilm": "classification", "smollm2-135m": "causal_lm"}
DATA = {"minilm": "rotten_tomatoes", "smollm2-135m": "chitchat"}  # --real: the suite's texts for each model


def model_of(name: str, device: str, dtype: torch.dtype, real: bool = False):
    """The model from its config with random weights, or (``real``) with its pretrained ones."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from adaptopt.cli.models import load_model, model_directory
    torch.manual_seed(0)
    if real:
        return load_model({"name": name}, MODELS[name])[0].to(device, dtype).train()
    config = AutoConfig.from_pretrained(model_directory({"name": name}))
    auto = AutoModelForSequenceClassification if MODELS[name] == "classification" else AutoModelForCausalLM
    return auto.from_config(config).to(device, dtype).train()


def batches_of(name: str, args, vocab: int) -> list[dict[str, torch.Tensor]]:
    """``args.steps`` batches: random tokens of length ``args.seq``, or (``args.real``) the suite's
    training texts for this model (:data:`DATA`), tokenized to at most ``args.seq`` and padded per
    batch with their attention mask, as the CLI's runs feed them."""
    if args.real:
        from adaptopt.cli.data import load_data
        from adaptopt.cli.models import load_model
        from adaptopt.cli.runner import collator, tokenized
        data = load_data({"name": DATA[name]}, "validation")
        tokenizer = load_model({"name": name}, MODELS[name])[1]
        rows = tokenized(data, tokenizer, args.seq, "train")
        collate = collator(data, tokenizer)
        return [{k: v.to(args.device) for k, v in collate(rows[i * args.batch:(i + 1) * args.batch]).items()}
                for i in range(args.steps)]
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(args.device)
        labels = ids if MODELS[name] == "causal_lm" else torch.randint(0, 2, (args.batch,), generator=generator)
        out.append({"input_ids": ids, "labels": labels.to(args.device)})
    return out


def one_run(name: str, policy, batches, device: str, dtype: torch.dtype, real: bool = False) -> float:
    """Seconds of a whole run: ``len(batches)`` steps from a fresh model and optimizer (building
    them is not timed; the scoring pass is, as the Trainer runs it)."""
    from adaptopt import AdaptiveOptimizer
    model = model_of(name, device, dtype, real)
    opt = AdaptiveOptimizer(model, lr=1e-4, policy=policy, total_steps=len(batches))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if opt.policy.decides_before_training():
        opt.score_before_training(lambda: model(**batches[0]).loss.backward())
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def timed(bar, *run) -> float:
    seconds = one_run(*run)
    bar.update()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quick", action="store_true", help="MiniLM only")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--policies", default=",".join(POLICIES), help="labels of POLICIES; lora is the baseline")
    parser.add_argument("--real", action="store_true", help="pretrained weights and the suite's texts (padded, "
                        "with their attention mask) instead of random weights and tokens")
    parser.add_argument("--out", default="results/compute_estimate")
    args = parser.parse_args()
    unknown = sorted(set(args.policies.split(",")) - set(POLICIES)) + sorted(set(args.models.split(",")) - set(MODELS))
    if unknown or "lora" not in args.policies.split(","):
        parser.error(f"unknown {unknown}, or no lora (the baseline): policies are {list(POLICIES)}, "
                     f"models {list(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("compute_estimate: no CUDA device here; run it on a GPU machine (scripts/gpu_check.sh)")
        return 2
    from tqdm import tqdm

    from adaptopt.cli.models import meta_model, model_directory
    from adaptopt.training.compute import estimate_compute, relative_compute
    dtype = getattr(torch, args.dtype)
    results = []
    models = ["minilm"] if args.quick else args.models.split(",")
    policies = {label: POLICIES[label] for label in args.policies.split(",")}
    for name in models:
        meta = meta_model(model_directory({"name": name}), MODELS[name]).to(dtype)
        batches = batches_of(name, args, meta.config.vocab_size)
        estimates = relative_compute({label: estimate_compute(meta, policy, args.batch, args.seq, run_steps=args.steps)
                                      for label, policy in policies.items()})
        bar = tqdm(total=args.repeats * len(policies), desc=name, unit="run")

        one_run(name, "lora", batches[:2], args.device, dtype, args.real)  # warm-up: kernels, allocator
        medians = interleaved_medians({label: functools.partial(timed, bar, name, policy, batches, args.device, dtype,
                                                                args.real)
                                       for label, policy in policies.items()}, args.repeats)
        bar.close()
        for label in policies:
            results.append({"model": name, "policy": label, "estimated": estimates[label],
                            "measured": medians[label] / medians["lora"], "seconds": medians[label]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compute_estimate.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"{args.device} {args.dtype}, batch {args.batch} x seq {args.seq}, {args.steps}-step runs, "
          f"median of {args.repeats} interleaved repeats; ratios to LoRA")
    print("| model | policy | FLOPs / LoRA (estimated) | time / LoRA (measured) | measured / estimated |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['policy']} | {r['estimated']:.3f} | {r['measured']:.3f} | "
              f"{r['measured'] / r['estimated']:.3f} |")
    plot(results, out / "compute_estimate.png", f"{args.device} {args.dtype}, batch {args.batch} × {args.seq}"
         + (", pretrained, the suite's texts" if args.real else ""))
    return 0


def plot(results, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, marker in zip(MODELS, "os"):
        mine = [r for r in results if r["model"] == name]
        ax.scatter([r["estimated"] for r in mine], [r["measured"] for r in mine], marker=marker, label=name)
        for r in mine:
            ax.annotate(r["policy"], (r["estimated"], r["measured"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    values = [v for r in results for v in (r["estimated"], r["measured"])]
    lo, hi = min(values) * 0.95, max(values) * 1.05
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="time ∝ FLOPs")
    ax.set_xlabel("estimated FLOPs per step / LoRA's")
    ax.set_ylabel("measured time / LoRA's")
    ax.set_title(f"compute estimate vs measured time\n{title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
