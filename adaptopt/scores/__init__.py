"""Layer scores: one module per family, each with its formula in its docstring.

- :mod:`.gradient` — gradient importance from the statistics hooks (AutoMode);
- :mod:`.spectrum` — Spectrum SNR, ``compat`` and Marchenko–Pastur ``mp``;
- :mod:`.svd`, :mod:`.entropy`, :mod:`.cosine` — layer-wise LR's SVD / CE / CS metrics;
- :mod:`.norms` — weight norms (activation magnitudes come from the hooks).

:func:`weight_scores` computes the weight-only families a policy asks for, in one pass
(singular values are shared by ``snr``, ``snr_compat`` and ``svd``).
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import torch

from .cosine import cosine_metric
from .entropy import cross_entropy_metric
from .gradient import unit_importance, units
from .normalise import UniformScoresError, normalise
from .norms import weight_norms
from .spectrum import SNR_MODES, mp_median, snr_compat, snr_mp, spectrum_snr
from .svd import spectral_mass, svd_metric
from .weights import effective_weights, singular_values

FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "snr": ("snr", "signal_fraction"),
    "snr_compat": ("snr_compat", "signal_fraction_compat"),
    "svd": ("svd", "svd_raw"),
    "ce": ("ce", "ce_raw"),
    "cs": ("cs", "cs_raw"),
    "weight_norm": ("weight_norm", "weight_rms"),
}
WEIGHT_FAMILIES = tuple(FAMILY_KEYS)


def _with_normalised(out: dict[str, dict[str, float]], raw: Mapping[str, float], key: str, metric: str) -> None:
    for name, value in raw.items():
        out[name][f"{key}_raw"] = value
    try:
        for name, value in normalise(raw, metric).items():
            out[name][key] = value
    except UniformScoresError as error:  # keep the raw values, leave the normalised key out, say why
        warnings.warn(str(error), RuntimeWarning, stacklevel=3)


def weight_scores(layers: Mapping[str, torch.nn.Module | torch.Tensor],
                  families: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per layer, the requested weight-only scores:

    ====================  ===============================================================
    family                keys
    ====================  ===============================================================
    ``snr``               ``snr``, ``signal_fraction`` (Marchenko–Pastur edge)
    ``snr_compat``        ``snr_compat``, ``signal_fraction_compat`` (``spectrum.py``)
    ``svd``               ``svd_raw``, ``svd`` (normalised to [0, 1] across layers)
    ``ce``                ``ce_raw``, ``ce``
    ``cs``                ``cs_raw``, ``cs``
    ``weight_norm``       ``weight_norm``, ``weight_rms``
    ====================  ===============================================================

    A normalised key is left out (with a ``RuntimeWarning`` that says why) when every layer
    has the same raw value.
    """
    families = list(dict.fromkeys(families))
    unknown = sorted(set(families) - set(WEIGHT_FAMILIES))
    if unknown:
        raise ValueError(f"unknown weight score famil{'ies' if len(unknown) > 1 else 'y'} {unknown}: "
                         f"choose from {list(WEIGHT_FAMILIES)}")
    out: dict[str, dict[str, float]] = {name: {} for name in layers}
    if not families or not layers:
        return out
    weights = effective_weights(layers)
    spectra = singular_values(weights) if {"snr", "snr_compat", "svd"} & set(families) else None
    for family in families:
        if family in ("snr", "snr_compat"):
            suffix = "" if family == "snr" else "_compat"
            for name, values in spectrum_snr(weights, "mp" if family == "snr" else "compat", spectra).items():
                out[name][f"snr{suffix}"] = values["snr"]
                out[name][f"signal_fraction{suffix}"] = values["signal_fraction"]
        elif family == "svd":
            _with_normalised(out, svd_metric(weights, spectra), "svd", "SVD")
        elif family == "ce":
            _with_normalised(out, cross_entropy_metric(weights), "ce", "CE")
        elif family == "cs":
            _with_normalised(out, cosine_metric(weights), "cs", "CS")
        else:
            for name, values in weight_norms(weights).items():
                out[name].update(values)
    return out


__all__ = [
    "FAMILY_KEYS", "SNR_MODES", "UniformScoresError", "WEIGHT_FAMILIES", "cosine_metric", "cross_entropy_metric",
    "effective_weights", "mp_median", "normalise", "singular_values", "snr_compat", "snr_mp", "spectral_mass",
    "spectrum_snr", "svd_metric", "unit_importance", "units", "weight_norms", "weight_scores",
]
