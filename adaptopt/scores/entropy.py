r"""Cross-entropy (CE) metric of layer-wise LR (docs/design.md §6): how unlike the other layers a layer's weights are.

Each layer's ``|w|`` is histogrammed on one common binning (``bins`` equal bins over
``[0, max_ℓ |w|]`` across all layers), so layers of different shapes compare:
``p_ℓ = hist_ℓ / numel_ℓ``. Then

.. math::
    H(p, q) = -\sum_j p(j)\log\big(q(j) + \epsilon\big),\qquad
    M^{\text{raw}}_{\text{CE}}(\ell) = \frac{1}{L-1}\sum_{i\ne\ell} H(p_\ell, p_i)

with ``ε = 1e-10`` (the source's constant), then min–max normalised across layers. (The source
code compares only same-shape layers, element by element; we want a metric valid across
shapes, which a distribution over a common binning is.)
"""
from __future__ import annotations

from typing import Mapping

import torch

EPS = 1e-10


def weight_histograms(weights: Mapping[str, torch.Tensor], bins: int = 64) -> torch.Tensor:
    """``L × bins`` probability rows of ``|w|`` on a common binning."""
    top = max(float(w.abs().max()) for w in weights.values())
    top = top if top > 0 else 1.0
    rows = [torch.histc(w.detach().abs().float().flatten(), bins=bins, min=0.0, max=top) for w in weights.values()]
    hist = torch.stack(rows).double()
    return hist / hist.sum(dim=1, keepdim=True).clamp_min(1)


def cross_entropy_metric(weights: Mapping[str, torch.Tensor], bins: int = 64,
                         ) -> dict[str, float]:
    """Raw ``M_CE``: mean cross-entropy of each layer against every other layer."""
    names = list(weights)
    if len(names) < 2:
        raise ValueError(f"the CE metric compares layers with each other: it needs ≥ 2 layers, got {len(names)}")
    p = weight_histograms(weights, bins)
    cross = -(p @ torch.log(p + EPS).T)  # cross[l, i] = H(p_l, p_i)
    off_diagonal = cross.sum(dim=1) - cross.diagonal()
    raw = {name: float(v) / (len(names) - 1) for name, v in zip(names, off_diagonal)}
    return raw
