"""Low-rank factor arithmetic shared by every adapter module.

All matrices here are in ``nn.Linear`` layout, ``(out_features, in_features)``; the
modules translate to and from GPT-2 ``Conv1D``'s ``(in, out)`` layout at their edge.
A LoRA update is ``ΔW = s · B @ A`` with ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

# Expected L2 norm of one row of A under kaiming_uniform_(a=√5): each entry is
# U(-1/√in, 1/√in) with variance 1/(3·in), so a row of ``in`` entries has norm ≈ 1/√3.
# Re-factorised adapters put their rows at this norm so they train like fresh ones.
KAIMING_ROW_NORM = 3.0 ** -0.5


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """``s = alpha / r``, or ``alpha / √r`` with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype adapter arithmetic runs in: float32, or float64 if any input is float64.

    Half-precision weights are upcast so a merge rounds once; float64 weights must not pass
    through float32, which would cost them nine digits.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_rank_alpha(rank: object, alpha: object) -> None:
    """Raise a ``ValueError`` naming the fix unless ``rank`` is a positive int and ``alpha > 0``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}: pass e.g. rank=8")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}: pass e.g. alpha=2*rank")


def fresh_factors(in_features: int, out_features: int, rank: int, *, dtype: torch.dtype,
                  device: torch.device) -> tuple[nn.Parameter, nn.Parameter]:
    """A new adapter: ``A`` Kaiming-uniform(a=√5), ``B`` zeros, so ``ΔW = 0``.

    The ``a=√5`` choice matches ``nn.Linear``'s own init and the reference LoRA code
    (microsoft/LoRA ``loralib/layers.py``); B = 0 makes the adapter start as the identity.
    """
    a = torch.empty(rank, in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank, dtype=dtype, device=device)
    return nn.Parameter(a), nn.Parameter(b)


class SVD(NamedTuple):
    """``M = U @ diag(S) @ Vh`` with ``S`` sorted descending (float32, or float64 for float64 inputs)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def svd_dense(delta: torch.Tensor) -> SVD:
    """Thin SVD of a dense ``(out, in)`` matrix, computed in :func:`compute_dtype`."""
    u, s, vh = torch.linalg.svd(delta.to(compute_dtype(delta.dtype)), full_matrices=False)
    return SVD(u, s, vh)


def svd_of_product(b: torch.Tensor, a: torch.Tensor, scaling: float, dtype: torch.dtype | None = None) -> SVD:
    """Thin SVD of ``s · B @ A`` without forming the ``out × in`` product.

    ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (reduced QR), so ``s·BA = Q_b (s·R_b R_aᵀ) Q_aᵀ``
    and only the small ``r × r`` core needs an SVD: ``O((out+in)·r²)`` instead of
    ``O(out·in·min(out, in))``. ``dtype`` (default :func:`compute_dtype`) is what it runs in.
    """
    dtype = dtype or compute_dtype(b.dtype, a.dtype)
    qb, rb = torch.linalg.qr(b.to(dtype))
    qa, ra = torch.linalg.qr(a.to(dtype).T)
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T, full_matrices=False)
    return SVD(qb @ u, s, vh @ qa.T)


def factors_from_svd(svd: SVD, rank: int, scaling: float, *, dtype: torch.dtype,
                     device: torch.device) -> tuple[nn.Parameter, nn.Parameter, torch.Tensor]:
    """Adapter factors whose update ``s·BA`` is the best rank-``rank`` approximation of ``svd``.

    Rows of ``A`` are the top right-singular vectors scaled to :data:`KAIMING_ROW_NORM`
    (the norm of a fresh row, so the adapter keeps training at the usual pace) and
    ``B = U_r diag(S_r) / (s · KAIMING_ROW_NORM)``. If ``rank`` exceeds the number of
    singular values, the extra rows are fresh Kaiming rows with zero ``B`` columns.

    Returns ``(A, B, discarded)`` where ``discarded`` holds the singular values left out;
    the Frobenius error of the approximation is ``‖discarded‖₂`` (Eckart–Young).
    """
    keep = min(rank, svd.S.numel())
    a = svd.Vh[:keep] * KAIMING_ROW_NORM
    b = svd.U[:, :keep] * (svd.S[:keep] / (scaling * KAIMING_ROW_NORM))
    if keep < rank:
        pad_a, pad_b = fresh_factors(a.shape[1], b.shape[0], rank - keep, dtype=a.dtype, device=a.device)
        a = torch.cat([a, pad_a.data])
        b = torch.cat([b, pad_b.data], dim=1)
    return (nn.Parameter(a.to(device=device, dtype=dtype)),
            nn.Parameter(b.to(device=device, dtype=dtype)),
            svd.S[keep:])


INITS = ("default", "pissa")


def check_init(init: object) -> str:
    """``"default"`` (A Kaiming, B = 0) or ``"pissa"``; PEFT's ``True`` means the default."""
    if init is True:
        return "default"
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} (PEFT's init_lora_weights=True means 'default'), "
                         f"got {init!r}")
    return str(init)


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float, *, dtype: torch.dtype,
                  device: torch.device) -> tuple[nn.Parameter, nn.Parameter]:
    """PiSSA (Meng et al., 2024): the principal rank-``r`` part of ``W`` (``(out, in)``) as factors,

    .. math::  A = \\mathrm{diag}(\\sqrt{S_r})\\,V_r^\top / \\sqrt{s}, \\qquad
               B = U_r\\,\\mathrm{diag}(\\sqrt{S_r}) / \\sqrt{s}, \\qquad s\\,BA = U_r S_r V_r^\top,

    the singular values split evenly between the factors. The caller keeps ``W − s·BA`` as the
    base weight, so the layer's function is unchanged. Rows beyond rank(W) are fresh (B = 0)."""
    svd = svd_dense(weight)
    keep = min(rank, svd.S.numel())
    root = (svd.S[:keep] / scaling).sqrt()
    a, b = root[:, None] * svd.Vh[:keep], svd.U[:, :keep] * root[None, :]
    if keep < rank:
        pad_a, pad_b = fresh_factors(a.shape[1], b.shape[0], rank - keep, dtype=a.dtype, device=a.device)
        a, b = torch.cat([a, pad_a.data]), torch.cat([b, pad_b.data], dim=1)
    return nn.Parameter(a.to(device=device, dtype=dtype)), nn.Parameter(b.to(device=device, dtype=dtype))


def grow_factors(a: torch.Tensor, b: torch.Tensor, old_scaling: float, new_rank: int,
                 new_scaling: float) -> tuple[nn.Parameter, nn.Parameter]:
    """Raise an adapter's rank exactly: keep ``A``, append fresh rows, rescale ``B``.

    ``A' = [A; A_new]``, ``B' = [B · s/s', 0]``, so ``s'·B'A' = s·BA``.
    """
    old_rank = a.shape[0]
    pad_a, pad_b = fresh_factors(a.shape[1], b.shape[0], new_rank - old_rank, dtype=a.dtype, device=a.device)
    with torch.no_grad():
        new_a = torch.cat([a, pad_a])
        new_b = torch.cat([(b.to(compute_dtype(b.dtype)) * (old_scaling / new_scaling)).to(b.dtype), pad_b], dim=1)
    return nn.Parameter(new_a), nn.Parameter(new_b)
