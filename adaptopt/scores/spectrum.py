r"""Spectrum signal-to-noise ratio of a weight matrix, in two flavours.

For ``W`` of shape ``m × n`` with singular values ``S`` (descending) and ``β = min(m,n)/max(m,n)``:

``compat`` — exactly what ``cognitivecomputations/spectrum``'s ``spectrum.py`` computes:

.. math::
    \hat\sigma = \mathrm{IQR}(S)/1.349,\quad \tau = \hat\sigma(1+\sqrt\beta),\quad
    \mathrm{SNR} = \frac{\sum_{S_i>\tau} S_i \,/\, \sum_{S_i\le\tau} S_i}{S_{\max}}

(an empty noise set counts as noise = 1). Its flaw: ``τ`` lacks the ``√max(m,n)`` factor
of a noise edge, so on non-square matrices every singular value of pure Gaussian noise
is "signal", and the division by ``S_max`` makes the score scale-dependent (``10·W``
scores ten times lower). Kept for reproducing Spectrum's selections.

``mp`` (default) — a Marchenko–Pastur noise edge. For noise of entry scale ``σ``,
``S_i²/max(m,n)`` follows the MP law of ratio ``β``, whose median ``μ_β`` is known, and the
largest noise singular value sits at ``σ(√m + √n)``:

.. math::
    \hat\sigma = \frac{\mathrm{median}(S)}{\sqrt{\max(m,n)\,\mu_\beta}},\quad
    \tau = \hat\sigma(\sqrt m + \sqrt n),\quad
    \mathrm{signal} = \frac{\sum_{S_i>\tau} S_i}{\sum_i S_i},\quad
    \mathrm{SNR} = \frac{\mathrm{signal}}{1-\mathrm{signal}}

Pure noise scores ≈ 0 signal; a rank-k matrix plus noise has exactly its k strong
directions above ``τ``; the score is scale-invariant. SNR and the signal fraction rank
layers identically (one is a monotone function of the other).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Mapping

import torch

from .weights import singular_values

SNR_MODES = ("mp", "compat")
MAX_SNR = 1e12  # an all-signal matrix (empty noise set) in mp mode


@lru_cache(maxsize=256)
def mp_median(beta: float) -> float:
    r"""Median of the Marchenko–Pastur law of ratio ``β ∈ (0, 1]`` and unit variance.

    Density ``f(x) = √((b−x)(x−a)) / (2πβx)`` on ``[a, b] = [(1−√β)², (1+√β)²]``; integrated
    in the variable ``x = a + (b−a)(1−cos θ)/2`` where it is smooth, then inverted at 1/2.
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    x = a + (b - a) * (1 - torch.cos(theta)) / 2
    half = (b - a) / 2
    integrand = torch.where(x > 0, half ** 2 * torch.sin(theta) ** 2 / (2 * math.pi * beta * x.clamp_min(1e-300)),
                            torch.tensor(half / (math.pi * beta) if a == 0 else 0.0, dtype=torch.float64))
    steps = (integrand[1:] + integrand[:-1]) / 2 * (theta[1] - theta[0])
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])
    cdf = cdf / cdf[-1]
    i = int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)))
    t = float((0.5 - cdf[i - 1]) / (cdf[i] - cdf[i - 1]))
    return float(x[i - 1] + t * (x[i] - x[i - 1]))


def snr_compat(s: torch.Tensor, shape: tuple[int, int]) -> dict[str, float]:
    """``spectrum.py``'s SNR of singular values ``s`` of a matrix of ``shape`` (see module doc)."""
    s = s.float()
    m, n = shape
    beta = min(m, n) / max(m, n)
    sigma = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    tau = sigma * (1 + math.sqrt(beta))
    signal = float(s[s > tau].sum())
    noise = float(s[s <= tau].sum())
    noise = noise if noise != 0 else 1.0
    s_max = float(s.max())
    return {"snr": (signal / noise) / s_max if s_max > 0 else 0.0,
            "signal_fraction": signal / max(float(s.sum()), 1e-30), "threshold": tau, "sigma": sigma}


def snr_mp(s: torch.Tensor, shape: tuple[int, int]) -> dict[str, float]:
    """Marchenko–Pastur SNR of singular values ``s`` of a matrix of ``shape`` (see module doc)."""
    s = s.double()
    m, n = shape
    big, small = max(m, n), min(m, n)
    sigma = float(s.median()) / math.sqrt(big * mp_median(small / big))
    tau = sigma * (math.sqrt(m) + math.sqrt(n))
    total = float(s.sum())
    signal = float(s[s > tau].sum()) / total if total > 0 else 0.0
    snr = MAX_SNR if signal >= 1 else min(signal / (1 - signal), MAX_SNR)
    return {"snr": snr, "signal_fraction": signal, "threshold": tau, "sigma": sigma}


def spectrum_snr(weights: Mapping[str, torch.Tensor], mode: str = "mp",
                 spectra: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """``{name: {"snr", "signal_fraction", "threshold", "sigma"}}`` for 2-D ``weights``.

    ``spectra`` (singular values per name) may be passed when already computed.
    """
    if mode not in SNR_MODES:
        raise ValueError(f"SNR mode must be one of {SNR_MODES}, got {mode!r}")
    spectra = spectra if spectra is not None else singular_values(weights)
    score = snr_mp if mode == "mp" else snr_compat
    return {name: score(spectra[name], tuple(w.shape)) for name, w in weights.items()}
