r"""Magnitude scores for rank allocation (docs/design.md §6): weight norms and input activations.

Weight: ``‖W‖_F`` and its size-free form ``rms(W) = ‖W‖_F / √(m·n)``.

Activation magnitude of a target's input ``x`` over the tokens ``t`` of the batches seen
while the statistics hooks were armed (:class:`adaptopt.training.layer_stats.StatsCollector`):

.. math::  \mathrm{act\_rms} = \sqrt{\tfrac{1}{N}\textstyle\sum_t \lVert x_t\rVert^2 / d},\qquad
           \mathrm{act\_mean\_abs} = \tfrac{1}{N d}\textstyle\sum_t \lVert x_t\rVert_1
"""
from __future__ import annotations

from typing import Mapping

import torch


def weight_norms(weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``{name: {"weight_norm": ‖W‖_F, "weight_rms": ‖W‖_F/√numel}}``."""
    out = {}
    for name, w in weights.items():
        norm = float(torch.linalg.vector_norm(w.float()))
        out[name] = {"weight_norm": norm, "weight_rms": norm / max(w.numel(), 1) ** 0.5}
    return out
