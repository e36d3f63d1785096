r"""How much arithmetic a fine-tune costs, per policy, before the run (docs/optimizer.md,
"Planning compute").

A training step's cost is dominated by its matrix products. :func:`estimate_compute` counts them
for every assignment the policy trains under in a run of ``T`` steps
(:meth:`Policy.run_phases`: Hybrid's all-LoRA calibration, its FULL blocks, then its frozen
prefix; each period's block for LISA and BAdam) and averages them by their steps, with the
scoring pass before training (``S``: one more forward and backward under the initial assignment,
for a policy that decides then; the score's random probes of the layers that do not train add a
few products more, left out):

.. math::  F = \frac{1}{T} \Big( S + \sum_{p} T_p \, F_{\text{step}}(a_p) \Big)

``F_step(a)`` is *traced*, not modelled: one forward, its loss and its backward run on ``meta``
tensors (nothing is computed or allocated) under :class:`torch.utils.flop_counter.FlopCounterMode`,
which counts ``2·m·n·k`` per product of an ``m×k`` and a ``k×n`` matrix (attention's too). So what
an assignment changes is seen as autograd runs it: a FULL layer adds its weight's gradient
(``2·N·d_in·d_out`` for ``N`` tokens, the cost of its forward again), a LoRA layer adds the small
products of its factors, and below the lowest unit that trains, backward stops — a frozen prefix
costs its forward only. Gradient checkpointing's second forward is counted.

Left out, and stated rather than guessed: the optimizer's update (a few element-wise operations
per trained element; AdamW over a FULL block is memory-bound, not arithmetic-bound), element-wise
work (norms, activations, softmax) and the kernels' efficiency: a product's time is not
proportional to its FLOPs for small matrices, and a weight's gradient may run slower than the
input's.
Its agreement with measured training times: docs/performance.md, row 8c.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..policies import build_policy
from ..policies.base import check_positive_int, size_scores
from ..surgery.inject import DEFAULT_ALPHA, DEFAULT_RANK
from .arguments import TASK_HEADS
from .memory import traced_step
from .planned_model import PlannedModel


@dataclass(frozen=True)
class ComputeEstimate:
    """The run's phases as ``(steps, FLOPs of one step, elements trained)``, in order (the
    elements are what the optimizer updates each step, a cost the FLOPs leave out), and the FLOPs
    of the scoring pass before training (one forward and backward under the initial assignment; 0
    for a policy that makes no decision before the first update)."""

    phases: tuple[tuple[int, int, int], ...]
    scoring_pass: int = 0

    @property
    def steps(self) -> int:
        return sum(phase[0] for phase in self.phases)

    @property
    def per_step(self) -> float:
        """FLOPs of the run over its steps, ``F`` in the module docstring (the scoring pass, if
        any, spread over the steps)."""
        return self.total / self.steps

    @property
    def total(self) -> int:
        """FLOPs of the whole run, its scoring pass included."""
        return self.scoring_pass + sum(steps * flops for steps, flops, _ in self.phases)

    @property
    def trained_per_step(self) -> float:
        """Elements the optimizer updates in an average step."""
        return sum(steps * trained for steps, _, trained in self.phases) / self.steps


def step_flops(model: nn.Module, batch_size: int, seq_len: int, device: torch.device | str = "meta") -> int:
    """FLOPs of one forward, loss and backward of ``model`` as its parameters require gradients
    now, on ``(batch_size, seq_len)`` tokens (``model`` on ``device``; ``meta`` computes nothing)."""
    counters: list[FlopCounterMode] = []

    def watch() -> FlopCounterMode:
        counters.append(FlopCounterMode(display=False))
        return counters[-1]

    traced_step(model, batch_size, seq_len, torch.device(device), watch, backward=True)
    return int(counters[-1].get_total_flops())


def estimate_compute(model: nn.Module, policy: Any = "hybrid", batch_size: int = 8, seq_len: int = 512, *,
                     run_steps: int = 1000, dtype: torch.dtype | None = None, rank: int = DEFAULT_RANK,
                     alpha: float = DEFAULT_ALPHA, targets: Any = "auto", gradient_checkpointing: bool = False,
                     trainable: tuple[str, ...] = TASK_HEADS, memory_budget: Any = None) -> ComputeEstimate:
    """The matrix-product FLOPs of a ``run_steps``-step fine-tune of ``model`` under ``policy``,
    phase by phase (the module docstring has the formula). ``model`` is copied to ``meta`` first,
    as :func:`~adaptopt.estimate_memory` does, and the arguments mean what they mean there; a 4-bit
    base multiplies as its dense weight does, so there is no ``quantize``. Compare policies by the
    ratio of their :attr:`ComputeEstimate.per_step` (``adaptopt plan`` prints it against LoRA's)."""
    check_positive_int("run_steps", run_steps)
    policy = build_policy(policy)
    planned = PlannedModel.build(model, policy, dtype=dtype, rank=rank, alpha=alpha, targets=targets,
                                 quantize=None, gradient_checkpointing=gradient_checkpointing,
                                 trainable=trainable, memory_budget=memory_budget, step=(batch_size, seq_len))
    traced: dict[tuple, tuple[int, int]] = {}  # the same assignment in two phases (BAdam's second pass) is traced once
    phases = []
    views = planned.views()
    scoring_pass = 0
    if policy.decides_before_training():  # as the HF Trainer callback runs it, on the first batch
        planned.adopt(policy.initial(views, size_scores(views)))
        scoring_pass = step_flops(planned.meta, batch_size, seq_len)
    for steps, assignment in policy.run_phases(views, run_steps):
        key = tuple(sorted((name, d.mode.value, d.rank) for name, d in assignment.items()))
        if key not in traced:
            planned.adopt(assignment)
            trained = sum(p.numel() for p in planned.meta.parameters() if p.requires_grad)
            traced[key] = step_flops(planned.meta, batch_size, seq_len), trained
        phases.append((steps, *traced[key]))
    return ComputeEstimate(tuple(phases), scoring_pass)


def relative_compute(estimates: Mapping[str, ComputeEstimate], baseline: str = "lora") -> dict[str, float]:
    """Each estimate's FLOPs per step over the ``baseline``'s."""
    base = estimates[baseline].per_step
    return {name: estimate.per_step / base for name, estimate in estimates.items()}
