"""Min–max normalisation of a per-layer metric to [0, 1], refusing to divide by zero."""
from __future__ import annotations

from typing import Mapping


class UniformScoresError(ValueError):
    """Every layer has the same value of a metric, so it cannot rank them."""


def normalise(values: Mapping[str, float], metric: str) -> dict[str, float]:
    r"""``(v - min) / (max - min)`` per layer.

    .. math::  \hat M_\ell = \frac{M_\ell - \min_k M_k}{\max_k M_k - \min_k M_k}

    Raises :class:`UniformScoresError` (naming the metric and the value) when all values are
    equal, including a single layer: the metric then says nothing about which layer differs.
    """
    if not values:
        return {}
    low, high = min(values.values()), max(values.values())
    spread = high - low
    if not spread > 1e-12 * max(abs(high), abs(low), 1e-30):
        raise UniformScoresError(
            f"all {len(values)} layers have the same {metric} value ({high:.6g}), so {metric} cannot rank them. "
            "Typical causes: identical layers (e.g. a model freshly initialised from one seed per layer), "
            "a single target layer, or one shape group holding every layer. Use another metric or more layers.")
    return {name: (value - low) / spread for name, value in values.items()}
