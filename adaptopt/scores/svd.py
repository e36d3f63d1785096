r"""SVD metric of layer-wise LR, as resolved in docs/design.md §6.

The source prints ``M_SVD = (1/n) Σ i/n``, which is a constant, and its code takes the mean
singular value, which is scale-dependent. Its stated intent — low when the singular
values drop off steeply, naturally in [0, 1] — is the normalised spectral mass:

.. math::  M^{\text{raw}}_{\text{SVD}}(\ell) = \frac{1}{n}\sum_{i=1}^{n} \frac{S_i}{S_{\max}} \in (0, 1]

(1 for a flat spectrum, 1/n for rank one), then min–max normalised across layers.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .weights import singular_values


def spectral_mass(s: torch.Tensor) -> float:
    """``mean(S) / max(S)`` (0 for a zero matrix)."""
    s_max = float(s.max())
    return float(s.float().mean()) / s_max if s_max > 0 else 0.0


def svd_metric(weights: Mapping[str, torch.Tensor], spectra: Mapping[str, torch.Tensor] | None = None,
               ) -> dict[str, float]:
    """Raw ``M_SVD`` (spectral mass) per layer; :func:`~adaptopt.scores.normalise` it across layers."""
    spectra = spectra if spectra is not None else singular_values(weights)
    raw = {name: spectral_mass(spectra[name]) for name in weights}
    return raw
