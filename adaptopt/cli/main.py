"""The ``adaptopt`` command.

::

    adaptopt demo                      # the main job: MiniLM on Rotten Tomatoes, 5 methods × 3 paired seeds
    adaptopt train CONFIG.yaml         # one fine-tune, evaluated and saved (adapters + merged model)
    adaptopt compare CONFIG.yaml       # methods × paired seeds: tables with intervals, pareto.png
    adaptopt tune CONFIG.yaml          # learning rates per parameter kind, chosen on a validation split
    adaptopt scan MODEL                # per-layer Spectrum SNR, and what top_percent would select
    adaptopt plan MODEL                # peak training memory per policy, from the config alone

CONFIG is a YAML file, or the name of a config shipped with the package (``main_job``: the
main job's). Every input is checked before anything trains; a bad one stops with one message naming the
file, the key and what was expected (exit code 2, and ``error.log`` in the output directory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, load_yaml, normalise

CONFIGS = Path(__file__).resolve().parent / "configs"  # run configs shipped with the package
DEMO_CONFIG = CONFIGS / "main_job.yaml"  # the main job: `adaptopt demo` runs it


def config_path(name: str) -> Path:
    """A config file: a path, or the name of a config shipped in ``adaptopt/cli/configs``
    (``main_job``), which ``adaptopt configs`` lists."""
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    shipped = CONFIGS / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ConfigError(f"{name}: no such config file, and no shipped config of that name (shipped: {names})")


INSTALL_HINTS = {"transformers": "pip install 'adaptopt[hf]'", "accelerate": "pip install 'adaptopt[hf]'",
                 "datasets": "pip install 'adaptopt[hf]'", "yaml": "pip install 'adaptopt[hf]' (PyYAML)",
                 "tqdm": "pip install 'adaptopt[hf]'", "matplotlib": "pip install 'adaptopt[plot]'",
                 "bitsandbytes": "pip install 'adaptopt[quant]'"}


def _fail(message: str, output_dir: str | None) -> int:
    print(f"adaptopt: error: {message}", file=sys.stderr)
    if output_dir and not (Path(output_dir).exists() and not Path(output_dir).is_dir()):
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.log").write_text(message + "\n")
    return 2


def _config(path: str | Path, output_dir: str | None) -> dict[str, Any]:
    path = config_path(str(path))
    config = normalise(load_yaml(path), str(path))
    if output_dir:
        config["output_dir"] = output_dir
    out = Path(config["output_dir"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{path}: output_dir: {out} exists and is a file; choose a directory path")
    return config


def _validate(config: dict[str, Any], methods: Sequence[dict[str, Any]], seed: int, split: str = "test") -> Any:
    """Load the data and build every method once (model + optimizer): all errors before training."""
    import matplotlib  # noqa: F401  (plots are drawn after training: fail now, not then)

    from .data import load_data
    from .runner import build
    data = load_data(config["data"], split)
    for note in data.notes:
        print(f"adaptopt: data: {note}", file=sys.stderr)
    built = None
    for method_cfg in methods:
        built = build(config, method_cfg, seed, data)
    return data, built


def cmd_train(args: argparse.Namespace) -> int:
    from .runner import train_run
    config = _config(args.config, args.output_dir)
    method = config["fine_tuning"]
    _, built = _validate(config, [method], config["training"]["seed"])
    out = Path(config["output_dir"])
    result = train_run(config, method, config["training"]["seed"], out, progress=not args.no_progress, built=built)
    print(json.dumps({k: v for k, v in result.items() if k != "run_dir"}, indent=1))
    print(f"run written to {out} (result.json, decisions.json, plots, adapters/, merged/)")
    return 0


def run_compare(config: dict[str, Any], split: str = "test") -> list[dict[str, Any]]:
    from .paired import paired_table
    from .report import markdown_table, plot_compare, plot_pareto, write_tables
    from .runner import compare_runs
    if not config["methods"]:
        raise ConfigError(f"{config['source']}: compare.methods: list the methods to compare")
    _validate(config, config["methods"], config["seeds"][0], split)
    out = Path(config["output_dir"])
    rows = compare_runs(config, out, split=split)
    summary = write_tables(rows, out)
    plot_compare(summary, out / "compare.png")
    plot_pareto(rows, out / "pareto.png")
    metric = next(k for k in ("accuracy", "perplexity", "loss") if k in rows[0])
    lrs = {m["label"]: _lr_label(m, config["training"]) for m in config["methods"]}
    paired = paired_table(rows, metric, lrs)
    (out / "paired.md").write_text(paired + "\n")
    print()
    print(f"{config['name']}: {len(config['seeds'])} paired seed(s) per method; model {config['model']}, data "
          f"{config['data'].get('name') or config['data'].get('path')} ({rows[0]['eval_examples']} {split} examples)")
    print(markdown_table(summary))
    print(f"\npaired over seeds {config['seeds']} (Δ: mean paired difference, 95% paired-t interval):")
    print(paired)
    print(f"\nwritten to {out}: results.csv, summary.json, summary.md, paired.md, compare.png, pareto.png, "
          "runs/*/(heatmap|modes|ranks).png")
    return summary


def _lr_label(method: dict[str, Any], training: dict[str, Any]) -> str:
    """The learning rates a method runs with, as the table prints them."""
    from .methods import optimizer_kwargs
    kwargs = optimizer_kwargs(method, training, method["label"])
    kinds = {"full": "lr", "bitfit": "lr"}.get(method["method"])
    if kinds == "lr" or method["method"] in ("spectrum", "topk"):
        return f"weights {kwargs['lr']:g}"
    if method["method"] in ("lora", "qlora", "alors", "rank_allocation"):
        return f"factors {kwargs['lora_lr']:g}"
    return f"weights {kwargs['lr']:g}, factors {kwargs['lora_lr']:g}"


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import grid_methods, run_tune
    config = _config(args.config, args.output_dir)
    if args.seeds:
        config["tune"]["seeds"] = [int(s) for s in args.seeds.split(",")]
    _validate(config, grid_methods(config)[:1], config["tune"]["seeds"][0], split="validation")
    run_tune(config)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = _config(args.config, args.output_dir)
    if args.seeds:
        config["seeds"] = [int(s) for s in args.seeds.split(",")]
    run_compare(config, args.split)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    config = _config(DEMO_CONFIG, args.output_dir)
    if args.quick:  # a first look: Full, LoRA and the shipped adaptive default on a quarter of the data
        config["methods"] = config["methods"][:3]
        config["data"] = {**config["data"], "max_train": 800, "max_eval": 600}
        config["seeds"] = [0, 1]
        if args.output_dir is None:
            config["output_dir"] = "runs/demo-quick"
    if args.seeds:
        config["seeds"] = [int(s) for s in args.seeds.split(",")]
    run_compare(config)
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from adaptopt import AdaptiveOptimizer, Spectrum

    from .models import load_model
    from .report import plot_scan
    model_cfg = {"path": args.model} if Path(args.model).exists() else {"name": args.model}
    try:
        model, _ = load_model(model_cfg, "as_saved")
        opt = AdaptiveOptimizer(model, policy=Spectrum(top_percent=args.top_percent, mode=args.mode))
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"scan {args.model}: {err}") from None
    key = "signal_fraction" if args.mode == "mp" else "signal_fraction_compat"
    snr = "snr" if args.mode == "mp" else "snr_compat"
    rows = [{"layer": n, "type": m.layer_type, "block": m.block_index, "snr": opt.scores[n].get(snr),
             "signal_fraction": opt.scores[n].get(key), "selected": m.mode.value == "full"}
            for n, m in opt.layers.items()]
    width = max(len(r["layer"]) for r in rows)
    print(f"{'layer'.ljust(width)}  {'SNR':>10}  {'signal %':>8}  selected (top {args.top_percent:g}% per type, "
          f"{args.mode})")
    for r in rows:
        print(f"{r['layer'].ljust(width)}  {r['snr']:>10.4g}  {100 * r['signal_fraction']:>7.1f}%  "
              f"{'yes' if r['selected'] else ''}")
    selected = sum(r["selected"] for r in rows)
    print(f"{selected} of {len(rows)} layers selected")
    out = Path(args.output_dir or Path("runs") / f"scan-{Path(args.model).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scan.json").write_text(json.dumps({"model": args.model, "mode": args.mode,
                                               "top_percent": args.top_percent, "layers": rows}, indent=1))
    plot_scan(rows, out / "scan.png", title=f"{args.model}: signal share per layer, top {args.top_percent:g}% "
                                             f"per type selected ({args.mode})")
    print(f"written to {out / 'scan.json'} and {out / 'scan.png'}")
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from .suite import load_suite, methods_to_run, run_suite, saved_rows, write_suite
    shipped = CONFIGS / "suites" / f"{args.config}.yaml"
    suite = load_suite(shipped if shipped.is_file() else config_path(args.config), args.output_dir)
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
        for task in suite["tasks"]:
            task["seeds"] = seeds
    if args.choose and args.split != "validation":
        raise ConfigError("suite: --choose selects the default on validation data only; add --split validation")
    only = args.tasks.split(",") if args.tasks else None
    unknown = sorted(set(only or ()) - {t["name"] for t in suite["tasks"]})
    if unknown:
        raise ConfigError(f"suite: --tasks {unknown}: not tasks of {suite['source']} "
                          f"({[t['name'] for t in suite['tasks']]})")
    methods = methods_to_run(suite, args.methods)
    if not args.report_only:
        for task in suite["tasks"]:
            run = [m for m in task["methods"] if not methods or m["label"] in methods]
            if not only or task["name"] in only:
                _validate(task, run or task["methods"][:1], task["seeds"][0], args.split)  # twins only: the data
        tasks = [t for t in suite["tasks"] if not only or t["name"] in only]
        labels = methods or suite["runnable"]
        print(f"suite {suite['name']}: {', '.join(labels)} on {', '.join(t['name'] for t in tasks)}, seeds "
              f"{tasks[0]['seeds']}: {len(labels) * sum(len(t['seeds']) for t in tasks)} runs", flush=True)
        run_suite(suite, args.split, only=only, methods=methods)
        if only and set(only) != {t["name"] for t in suite["tasks"]}:
            print(f"\nran {only}; `adaptopt suite {args.config} --split {args.split} --report-only` reports every task")
            return 0
    write_suite(saved_rows(suite, args.split, only if args.report_only else None), suite, args.split, args.choose)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Peak training memory and compute per policy, from the model's config alone (built on the meta
    device)."""
    import torch
    from transformers import AutoConfig

    from adaptopt import estimate_memory
    from adaptopt.policies.base import OverBudget
    from adaptopt.training.compute import estimate_compute, relative_compute
    from adaptopt.training.estimate import plan_table

    from .models import meta_model, model_directory, planned_task
    if args.steps <= 0:
        raise ConfigError(f"plan: --steps {args.steps}: the run's length must be a positive number of optimizer steps")
    source = {"path": args.model} if Path(args.model).exists() else {"name": args.model}
    directory = model_directory(source)
    config = AutoConfig.from_pretrained(directory)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"plan: --dtype {args.dtype!r}: expected float32, bfloat16 or float16")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and args.seq_len > limit:
        raise ConfigError(f"plan: --seq-len {args.seq_len}, but this model reads at most {limit} positions")
    autocast = getattr(torch, args.autocast, None) if args.autocast else None
    if args.autocast and autocast not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"plan: --autocast {args.autocast!r}: expected bfloat16 or float16")
    task = args.task if args.task != "auto" else planned_task(config)
    model = meta_model(directory, task)
    estimates, computed, refused = {}, {}, []
    for name in args.policies.split(","):
        try:
            memory = estimate_memory(model, name, args.batch_size, args.seq_len, dtype=dtype, rank=args.rank,
                                     gradient_checkpointing=args.gradient_checkpointing, memory_budget=args.budget,
                                     autocast=autocast)
            computed[name] = estimate_compute(model, name, args.batch_size, args.seq_len, run_steps=args.steps,
                                              dtype=dtype, rank=args.rank, memory_budget=args.budget,
                                              gradient_checkpointing=args.gradient_checkpointing)
            estimates[name] = memory
        except OverBudget as err:
            refused.append(f"{name}: refused by the budget: {err}")  # the other policies still plan
        except ValueError as err:
            raise ConfigError(f"plan: policy {name!r}: {err}") from None
    if not estimates:
        raise ConfigError("plan: " + "; ".join(refused))
    if "lora" not in computed:
        computed["lora"] = estimate_compute(model, "lora", args.batch_size, args.seq_len, run_steps=args.steps,
                                            dtype=dtype, rank=args.rank,
                                            gradient_checkpointing=args.gradient_checkpointing)
    print(f"{args.model} as a {'sequence classifier' if task == 'classification' else 'causal language model'} "
          f"(--task): batch {args.batch_size} × {args.seq_len} tokens, weights in {args.dtype}, LoRA rank "
          f"{args.rank}{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{f', memory budget {args.budget}' if args.budget else ''}"
          f"{f', autocast to {args.autocast}' if args.autocast else ''} (GB; the process itself, "
          "a CUDA context and allocator slack come on top; FLOPs / LoRA: the matrix products of an average "
          f"step of a {args.steps}-step run, over LoRA's)")
    print(plan_table(estimates, relative_compute(computed)))
    for line in refused:
        print(line)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptopt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="one fine-tune from a YAML config")
    train.add_argument("config")
    train.add_argument("--output-dir")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=cmd_train)
    compare = sub.add_parser("compare", help="methods × seeds from a YAML config, with the comparison table")
    compare.add_argument("config")
    compare.add_argument("--output-dir")
    compare.add_argument("--seeds", help="comma-separated seeds (overrides compare.seeds)")
    compare.add_argument("--split", choices=("test", "validation"), default="test",
                         help="evaluate on the held-out test side (default) or on a validation part carved from "
                              "the training side (to choose settings without touching the test side)")
    compare.set_defaults(run=cmd_compare)
    tune = sub.add_parser("tune", help="learning rates per parameter kind, chosen on a validation split")
    tune.add_argument("config")
    tune.add_argument("--output-dir")
    tune.add_argument("--seeds", help="comma-separated seeds (overrides tune.seeds)")
    tune.set_defaults(run=cmd_tune)
    demo = sub.add_parser("demo", help="the main job: MiniLM on Rotten Tomatoes, five methods × "
                          "three paired seeds (~23 min on 2 cores)")
    demo.add_argument("--output-dir")
    demo.add_argument("--quick", action="store_true",
                      help="a first look in a few minutes: Full, LoRA and the adaptive default, 2 seeds, 50 steps")
    demo.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    demo.set_defaults(run=cmd_demo)
    scan = sub.add_parser("scan", help="Spectrum SNR per layer and the selection top_percent makes")
    scan.add_argument("model", help="registry name (minilm, smollm2-135m) or a model directory")
    scan.add_argument("--top-percent", type=float, default=50.0)
    scan.add_argument("--mode", choices=("mp", "compat"), default="mp")
    scan.add_argument("--output-dir")
    scan.set_defaults(run=cmd_scan)
    suite = sub.add_parser("suite", help="methods × tasks × paired seeds: the suite table, Pareto plots, the "
                           "default chosen on validation")
    suite.add_argument("config", help="a suite file (or 'suite' / 'suite_quick', the shipped ones)")
    suite.add_argument("--split", choices=("test", "validation"), default="test")
    suite.add_argument("--seeds", help="comma-separated seeds (default: the file's)")
    suite.add_argument("--choose", action="store_true", help="choose the default among the file's candidates "
                       "(needs --split validation)")
    suite.add_argument("--tasks", help="comma-separated task names: run only these (a suite in parts); with "
                       "--report-only, report only these")
    suite.add_argument("--methods", help="comma-separated method labels: run only these (their rows replace the "
                       "saved ones of the same seeds; the task's other saved rows stay); 'all': every method "
                       "(default: the file's benchmark, or every method)")
    suite.add_argument("--report-only", action="store_true", help="report the saved results of every task, "
                       "running nothing")
    suite.add_argument("--output-dir")
    suite.set_defaults(run=cmd_suite)
    plan = sub.add_parser("plan", help="peak training memory and compute per policy, estimated from the model's "
                          "config")
    plan.add_argument("model", help="registry name (minilm, smollm2-135m) or a folder with config.json")
    plan.add_argument("--policies", default="full,lora,qlora,hybrid,automode,lisa,badam")
    plan.add_argument("--batch-size", type=int, default=8)
    plan.add_argument("--seq-len", type=int, default=512)
    plan.add_argument("--dtype", default="float32")
    plan.add_argument("--rank", type=int, default=16)
    plan.add_argument("--gradient-checkpointing", action="store_true")
    plan.add_argument("--task", default="auto", choices=("auto", "classification", "causal_lm"),
                      help="the head planned: a sequence classifier or a language model's output layer (auto: "
                      "the class config.json names; a bare encoder such as MiniLM's BertModel: a classifier)")
    plan.add_argument("--steps", type=int, default=1000, help="the run's length in optimizer steps, for the compute "
                      "column (Hybrid's prefix freezes at a fraction of it; LISA and BAdam change blocks by it)")
    plan.add_argument("--autocast", default=None, help="bfloat16 or float16: a mixed-precision step (weights, "
                      "gradients and moments in --dtype, activations in this)")
    plan.add_argument("--budget", default=None, help="a memory budget ('24GB', '1.3x', 'lora+25%%'): policies that "
                      "spend one (hybrid, automode, lisa, badam) plan within it")
    plan.set_defaults(run=cmd_plan)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        return _fail(str(err), getattr(args, "output_dir", None) or _configured_output(args))
    except ImportError as err:
        hint = INSTALL_HINTS.get((err.name or "").split(".")[0])
        message = f"missing package {err.name!r}: {hint}" if hint else f"a missing package: {err}"
        return _fail(message, getattr(args, "output_dir", None) or _configured_output(args))


def _configured_output(args: argparse.Namespace) -> str | None:
    """The output_dir a config file names, if it can be read at all (for the error log)."""
    path = getattr(args, "config", None)
    if not path:
        return None
    try:
        return str(load_yaml(path).get("output_dir") or "") or None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
