r"""Gradient importance (AutoMode), comparable across modes (docs/design.md §6).

While the statistics hooks are armed, every target layer ``ℓ`` — frozen, LoRA or full —
accumulates the squared Frobenius norm of the gradient its *full* weight would get,
``G_ℓ = δᵀx`` (``x`` = layer input, ``δ`` = gradient at its output, per micro-batch ``b``):

.. math::  g_\ell = \sqrt{\tfrac{1}{B}\textstyle\sum_{b=1}^{B} \lVert \delta_b^\top x_b \rVert_F^2}

over the ``B`` micro-batches since the last decision (see :class:`adaptopt.training.layer_stats.StatsCollector`).
A LoRA factor's own gradient (``s·BᵀG`` for ``A``) shrinks or grows with the adapter's
state; ``g_ℓ`` does not, so a layer's score does not jump when its mode changes.

A unit (a transformer block at ``granularity="block"``, else a single layer) scores the
norm of the gradient of all its targets together:

.. math::  g_{\text{unit}} = \sqrt{\textstyle\sum_{\ell\in\text{unit}} g_\ell^2}

Extra cost, only on armed steps: one ``(out × N) @ (N × in)`` matmul per target layer in
the backward pass (``N`` = tokens; the cost of a full weight gradient), the forward
hook's ``Σx²`` / ``Σ|x|`` reductions, and backpropagation through frozen layers below the
lowest trainable one. Unarmed steps carry no hooks at all.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

GRANULARITIES = ("block", "module")


def unit_of(view, granularity: str) -> str:
    """The unit a layer is decided with: its block (if any) at block granularity, else itself."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return view.block_name if granularity == "block" and view.block_name is not None else view.name


def units(views: Iterable, granularity: str) -> dict[str, list[str]]:
    """``{unit: [layer names]}`` in model order."""
    out: dict[str, list[str]] = {}
    for view in views:
        out.setdefault(unit_of(view, granularity), []).append(view.name)
    return out


def unit_importance(groups: Mapping[str, list[str]], scores: Mapping[str, Mapping[str, float]],
                    key: str = "grad_norm") -> dict[str, float]:
    """``√(Σ g_ℓ²)`` per unit. Raises ``ValueError`` naming layers without a score."""
    missing = sorted(name for names in groups.values() for name in names if key not in scores.get(name, {}))
    if missing:
        raise ValueError(f"no {key!r} score for {missing[:8]}: the statistics hooks did not see these layers "
                         "since the last decision (were they called in the forward pass?)")
    return {unit: math.sqrt(sum(scores[name][key] ** 2 for name in names)) for unit, names in groups.items()}
