"""What a finished run computed: the FLOPs of its average step, priced from its own timeline
(``decisions.json``) by the compute estimate (adaptopt/training/compute.py) — so a suite's table
can set the arithmetic each method did beside the time it took (docs/cli.md, "The task suite").

The timeline becomes its static twin's plan (:func:`adaptopt.cli.twins.static_twin`: every mode
from step 0, late freezes at their steps), which prices the run exactly when its decisions came
before the first update, as the default's do (a run that calibrated for ``c`` steps first is priced
as if it had not: ``c`` steps early). The model is built from its config on the ``meta`` device.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from .models import meta_model, model_directory
from .twins import static_twin


@lru_cache(maxsize=8)
def _meta_model(directory: str, classifier: bool) -> Any:
    return meta_model(Path(directory), "classification" if classifier else "causal_lm")


@lru_cache(maxsize=256)
def _priced(directory: str, classifier: bool, plan: str, policy: str, output_adapter: bool, rank: int,
            trainable: tuple[str, ...], batch_size: int, seq_len: int, steps: int) -> float:
    from adaptopt.policies import Scheduled, build_policy
    from adaptopt.training.compute import estimate_compute
    ran = build_policy(json.loads(policy))
    if ran.method == "full":  # Full trains the embeddings and norms too, which no plan names
        priced = ran
    else:
        priced = Scheduled(json.loads(plan))
        priced.adapts_output_layer = output_adapter  # the output adapter trained all run (a twin too)
    estimate = estimate_compute(_meta_model(directory, classifier), priced, batch_size, seq_len, run_steps=steps,
                                rank=rank, trainable=trainable)
    return estimate.per_step


def run_flops(row: Mapping[str, Any], task: Mapping[str, Any]) -> float:
    """FLOPs of an average training step of the run ``row`` describes (its ``run_dir`` holds the
    timeline), for ``task``'s model and a ``batch_size × max_length`` batch. Its LoRA rank and what
    else trains (the task head, a method's ``trainable``, the policy's own: Hybrid's pooler) are the
    method's, read from ``task``'s methods by the row's label (a twin: its adaptive method's); a
    method's ``train_embeddings`` is not priced (an embedding's gradient is no matrix product, but
    a trained output layer's is)."""
    from adaptopt.policies import build_policy
    from adaptopt.surgery.inject import DEFAULT_RANK
    from adaptopt.training.arguments import TASK_HEADS

    from .methods import optimizer_kwargs
    decisions = json.loads((Path(row["run_dir"]) / "decisions.json").read_text())
    training = task["training"]
    label = row["method"].removesuffix(" twin")
    method = next((m for m in task["methods"] if m["label"] == label), None)
    if method is None:  # a label the suite file no longer has: the run's own policy says what it can
        rank, trainable = int(decisions["policy"].get("rank") or DEFAULT_RANK), TASK_HEADS
    else:
        kwargs = optimizer_kwargs(method, training, f"suite: {label}")
        extra = build_policy(kwargs["policy"]).trainable_extra()
        rank, trainable = int(kwargs["rank"]), tuple(dict.fromkeys([*kwargs["trainable"], *extra]))
    return _priced(str(model_directory(task["model"])), "accuracy" in row, json.dumps(static_twin(decisions)),
                   json.dumps(decisions["policy"], sort_keys=True), bool(decisions.get("output_adapter")), rank,
                   tuple(trainable), int(training["batch_size"]), int(training["max_length"]), int(row["steps"]))


def with_flops(rows: list[dict[str, Any]], tasks: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``flops_per_step`` (:func:`run_flops`) where it is missing and the run's timeline
    is on disk (``tasks``: the suite's tasks by name); rows written before it existed gain it here."""
    out = []
    for row in rows:
        if "flops_per_step" not in row and row.get("task") in tasks and \
                (Path(row.get("run_dir", "")) / "decisions.json").is_file():
            row = {**row, "flops_per_step": run_flops(row, tasks[row["task"]])}
        out.append(row)
    return out
