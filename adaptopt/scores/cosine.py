r"""Cosine-similarity (CS) metric of layer-wise LR (docs/design.md §6): how redundant a layer is with its peers.

Only layers of the same shape are compared (a flattened ``768×768`` and ``3072×768`` have no
common coordinates). Within a shape group ``G(ℓ)``:

.. math::
    M^{\text{raw}}_{\text{CS}}(\ell) = \frac{1}{|G(\ell)|-1}\sum_{j\in G(\ell),\,j\ne\ell}
    \frac{w_\ell\cdot w_j}{\lVert w_\ell\rVert\,\lVert w_j\rVert}

A layer alone in its shape group has nothing to be redundant with: ``M = 0`` (the
expected similarity of unrelated weights). Then min–max normalised across all layers.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch


def cosine_metric(weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Raw ``M_CS``: mean cosine similarity of each layer to its same-shape peers."""
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, w in weights.items():
        groups[tuple(w.shape)].append(name)
    raw: dict[str, float] = {}
    for names in groups.values():
        if len(names) == 1:
            raw[names[0]] = 0.0
            continue
        flat = torch.stack([weights[n].detach().double().flatten() for n in names])
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
        sims = unit @ unit.T
        means = (sims.sum(dim=1) - sims.diagonal()) / (len(names) - 1)
        raw.update((n, float(v)) for n, v in zip(names, means))
    raw = {name: raw[name] for name in weights}
    return raw
