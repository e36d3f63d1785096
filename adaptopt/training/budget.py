r"""Memory budgets: how much a run may spend, what an assignment costs, and keeping to it
(docs/optimizer.md, "Memory budgets").

An assignment — every target layer's ``(mode, rank)`` — costs what :mod:`adaptopt.training.memory`
estimates for it, from shapes alone:

.. math::  C = W + 2·G + \max(A,\ G + g)

(:func:`~adaptopt.training.memory.peak_bytes`): ``W`` every tensor's storage, ``G`` the gradients
of what trains (AdamW's two moments are ``2·G``), ``g`` the temporaries at the end of backward
(AdamW's, for the largest optimizer group; a tied weight's second gradient), ``A`` the
activations and logits of one step (traced for ``batch_size × seq_len`` when the budget names
them, else 0: the budget then covers the model's states only). The two reference points are
**LoRA** (every target layer LoRA at its rank, the optimizer's trainable heads) and **Full**
(every parameter trains). A limit is written as

- bytes: ``24_000_000_000``, ``"24GB"``, ``"22.5GiB"``;
- a multiple of LoRA's memory: ``1.3`` or ``"1.3x"``;
- LoRA plus a share of the gap to Full: ``"lora+25%"`` = ``LoRA + 0.25·(Full − LoRA)``.

A limit below LoRA's cost is refused with both numbers. A policy that spends a budget
(``Policy.spends_budget``: Hybrid, AutoMode, LISA, BAdam) chooses its FULL units with it; for any
other policy the optimizer refuses an initial assignment above it and drops a later decision's
promotions, last first, until it fits (with a warning).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from ..layers.lora import LoRALinear
from ..modes import Mode
from ..policies.base import Budget, LayerDecision, LayerView, OverBudget
from .memory import layouts_for, peak_bytes, state_bytes, traced_activations
from .transitions import TrainRules

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
FORMS = "bytes (24_000_000_000, '24GB', '22.5GiB'), a multiple of LoRA's memory (1.3, '1.3x'), or 'lora+25%'"


@dataclass(frozen=True)
class MemoryBudget:
    """A limit on peak training memory (the module docstring lists its forms); with
    ``batch_size`` and ``seq_len`` the activations of such a step count against it too."""

    limit: int | float | str
    batch_size: int | None = None
    seq_len: int | None = None

    def __post_init__(self) -> None:
        parse_limit(self.limit)
        if (self.batch_size is None) != (self.seq_len is None):
            raise ValueError("MemoryBudget: give batch_size and seq_len together (the step whose activations "
                             "count), or neither (the budget then covers weights, gradients and optimizer states)")
        for label, value in (("batch_size", self.batch_size), ("seq_len", self.seq_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"MemoryBudget: {label} must be a positive int, got {value!r}")

    @classmethod
    def coerce(cls, spec: Any) -> "MemoryBudget":
        return spec if isinstance(spec, MemoryBudget) else cls(spec)


def parse_limit(limit: Any) -> tuple[str, float]:
    """``("bytes", n)``, ``("times", k)`` (× LoRA) or ``("gap", f)`` (LoRA + f·(Full − LoRA))."""
    if isinstance(limit, bool):
        raise ValueError(f"memory_budget: expected {FORMS}; got {limit!r}")
    if isinstance(limit, int) and limit > 0:
        return "bytes", float(limit)
    if isinstance(limit, float) and limit > 0:
        return "times", limit
    if isinstance(limit, str):
        text = limit.strip().lower().replace("_", "")
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)", text):
            return "bytes", float(m.group(1)) * UNITS[m.group(2)]
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*x", text):
            return "times", float(m.group(1))
        if m := re.fullmatch(r"lora\s*\+\s*(\d+(?:\.\d+)?)\s*%", text):
            return "gap", float(m.group(1)) / 100
    raise ValueError(f"memory_budget: expected {FORMS}; got {limit!r}")


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget in bytes beside its reference points (bytes), as the optimizer reports them."""

    limit: int
    lora: int
    full: int
    activations: int

    def describe(self) -> str:
        gb = 1e9
        share = (self.limit - self.lora) / (self.full - self.lora) if self.full > self.lora else 0.0
        return (f"{self.limit / gb:.3g} GB (LoRA {self.lora / gb:.3g} GB, Full {self.full / gb:.3g} GB: "
                f"LoRA + {100 * share:.0f}% of the gap)")


def assignment_cost(model: nn.Module, layers: Mapping[str, LoRALinear], rules: TrainRules, activations: int,
                    weight_offset: int = 0) -> Callable[[Mapping[str, tuple[Mode, int]]], int]:
    """``modes → C`` (the module docstring); ``weight_offset`` corrects ``W`` (the estimator's 4-bit
    bases, built plain on the meta device)."""
    def cost(modes: Mapping[str, tuple[Mode, int]]) -> int:  # a layer not in ``modes`` (the output adapter) as it is
        layouts = {**{name: m.layout() for name, m in layers.items()}, **layouts_for(layers, modes)}
        states = state_bytes(model, layers, rules, layouts)
        return peak_bytes(states.weights + weight_offset, states.gradients, activations, states.transient)
    return cost


def resolve_budget(spec: Any, model: nn.Module, layers: Mapping[str, LoRALinear], rules: TrainRules,
                   base_rules: TrainRules, activations: int | None = None, weight_offset: int = 0
                   ) -> tuple[Budget, ResolvedBudget]:
    """The policy's :class:`~adaptopt.policies.base.Budget` and the figures behind it. ``rules``
    are the run's (with the policy's extra trainables), ``base_rules`` the user's (LoRA's
    reference); ``activations`` overrides the traced ones, ``weight_offset`` corrects ``W``
    (:func:`assignment_cost`; the estimator passes both).
    Raises ``ValueError`` for a limit below LoRA's cost, naming both."""
    budget = MemoryBudget.coerce(spec)
    if activations is None:
        activations = (traced_activations(model, layers, budget.batch_size, budget.seq_len)
                    if budget.batch_size is not None else 0)
    cost = assignment_cost(model, layers, rules, activations, weight_offset)
    lora = assignment_cost(model, layers, base_rules, activations, weight_offset)(
        {n: (Mode.LORA, m.rank) for n, m in layers.items()})
    full = assignment_cost(model, layers, TrainRules(True, (), ()), activations, weight_offset)(
        {n: (Mode.FULL, m.rank) for n, m in layers.items()})
    kind, value = parse_limit(budget.limit)
    limit = int(value if kind == "bytes" else value * lora if kind == "times" else lora + value * (full - lora))
    resolved = ResolvedBudget(limit, lora, full, activations)
    if limit < lora:
        what = "" if budget.batch_size is not None else " (weights, gradients and optimizer states)"
        raise OverBudget(f"memory_budget {limit / 1e9:.3g} GB is below what LoRA needs for this model{what}: "
                         f"{lora / 1e9:.3g} GB (Full: {full / 1e9:.3g} GB). Raise it to at least that, e.g. "
                         f"memory_budget='lora+25%', or lower the LoRA rank")
    return Budget(limit, cost), resolved


def within_budget(budget: Budget, views: Mapping[str, LayerView], decisions: Mapping[str, LayerDecision],
                  method: str, initial: bool) -> dict[str, LayerDecision]:
    """``decisions`` if they fit; an initial assignment that does not is refused (``ValueError``),
    a later one loses its costliest moves — decisions that raise the cost, last first — until it
    fits, with a warning."""
    decisions = dict(decisions)
    if budget.fits(views, decisions):
        return decisions
    needed = budget.cost_of(views, decisions)
    if initial:
        raise OverBudget(f"policy {method!r} starts with an assignment that needs {needed / 1e9:.3g} GB, above "
                         f"memory_budget {budget.limit / 1e9:.3g} GB. Raise the budget, or choose a policy that "
                         "spends one (hybrid, automode, lisa, badam)")
    before = budget.cost_of(views, {})
    for name in reversed(list(decisions)):
        if budget.fits(views, decisions):
            break
        alone = budget.cost_of(views, {name: decisions[name]})
        if alone > before:
            del decisions[name]
    warnings.warn(f"policy {method!r} decided an assignment that needs {needed / 1e9:.3g} GB, above memory_budget "
                  f"{budget.limit / 1e9:.3g} GB: the moves that cost memory were dropped, last first, until it fit",
                  stacklevel=3)
    return decisions
