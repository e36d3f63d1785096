"""The weights the weight-only scores read, and their singular values, computed once.

Scores read each target's *effective* weight (``W + ΔW``: what the layer computes with,
whatever its mode), as an fp32 ``(out, in)`` matrix.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch


def effective_weights(layers: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``{name: W_eff}`` for adapter modules (``effective_weight()``) or plain tensors."""
    out = {}
    for name, layer in layers.items():
        if isinstance(layer, torch.Tensor):
            weight = layer.detach().float()
            out[name] = weight if weight.ndim == 2 else weight.reshape(1, -1)
        else:
            out[name] = layer.effective_weight()
    return out


def singular_values(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Singular values (descending, fp32) of every matrix; same-shape matrices go through
    ``torch.linalg.svdvals`` as one batch."""
    by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, weight in weights.items():
        by_shape[tuple(weight.shape)].append(name)
    out: dict[str, torch.Tensor] = {}
    for names in by_shape.values():
        stacked = torch.stack([weights[n].float() for n in names])
        values = torch.linalg.svdvals(stacked)
        out.update(zip(names, values.unbind(0)))
    return {name: out[name] for name in weights}
