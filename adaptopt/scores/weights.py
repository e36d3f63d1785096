"""The weights the weight-only scores read, and their singular values, computed once.

Scores read each target's *effective* weight (``W + ΔW``: what the layer computes with,
whatever its mode), as an fp32 ``(out, in)`` matrix.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
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


SINGULAR_VALUE_METHODS = ("gram", "svd")


def singular_values(weights: Mapping[str, torch.Tensor], method: str = "gram",
                    workers: int | None = None) -> dict[str, torch.Tensor]:
    r"""Singular values (descending, fp32) of every matrix, each distinct tensor computed once.

    ``method="gram"`` (default): from the eigenvalues of the smaller Gram matrix in float64,

    .. math::  S_i = \sqrt{\max(\lambda_i(G), 0)},\qquad G = W^\top W \ (m \ge n) \text{ or } W W^\top

    The Gram matrix is formed in float64 (products of fp32 entries are exact there), so
    ``λ`` is off by ``~eps₆₄·σ_max²`` and ``S_i`` by ``~eps₆₄·σ_max²/σ_i`` — far inside the
    fp32 rounding of ``svdvals`` for every ``σ_i > 10⁻⁴·σ_max``. A symmetric tridiagonal
    reduction costs half a bidiagonal one, and a tall ``m × n`` matrix shrinks to ``n × n``.
    ``method="svd"``: one fp32 ``torch.linalg.svdvals`` per matrix (``spectrum.py``'s way).

    ``workers`` matrices are processed at once, one thread each (default: ``min(2, cores)``;
    LAPACK's own threading gains little on these sizes). Tensors sharing storage, shape and
    strides — tied weights — are computed once.
    """
    if method not in SINGULAR_VALUE_METHODS:
        raise ValueError(f"singular value method must be one of {SINGULAR_VALUE_METHODS}, got {method!r}")
    distinct: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for name, weight in weights.items():
        alias[name] = distinct.setdefault(_identity(weight), name)
    compute = _gram_singular_values if method == "gram" else _svd_singular_values
    names = list(distinct.values())
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(names) < 2:
        values = [compute(weights[n]) for n in names]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                values = list(pool.map(lambda n: compute(weights[n]), names))
        finally:
            torch.set_num_threads(threads)
    out = dict(zip(names, values))
    return {name: out[alias[name]] for name in weights}


def _identity(weight: torch.Tensor) -> tuple:
    if weight.device.type == "meta":
        return (id(weight),)
    return (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), weight.stride(),
            weight.dtype, weight.device)


def _svd_singular_values(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.float())


def _gram_singular_values(weight: torch.Tensor) -> torch.Tensor:
    w = weight.double()
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt().float()
