r"""One autograd node for a LoRA layer over a frozen 4-bit base.

.. math::  y = x\,\mathrm{deq}(Q)^\top + b + s\,(x A^\top) B^\top

The same node as :mod:`adaptopt.layers.fused_lora`, with the dense weight made on demand: ``deq(Q)`` is
computed inside forward, used for one GEMM and dropped; backward computes it again for
``∂_x = g\,\mathrm{deq}(Q) + s\,(g B) A``. Between the two only ``x`` and the small
``h = x Aᵀ`` (``N × r``) are kept, never a dense copy of the weight, and no ``N × out``
temporaries beyond the output (the adapter product is accumulated inside the second GEMM).
Gradients of ``A`` and ``B`` are those of the plain node: ``∂_B = s\,g^\top h``,
``∂_A = s\,(gB)^\top x``.

Used where it is exact to do so (:func:`can_fuse_quant`): no dropout, no autocast, the input
already in the layer's compute dtype; everything else takes the composite path.
"""
from __future__ import annotations

from typing import Callable

import torch


class FusedQuantLoRALinear(torch.autograd.Function):
    """``y = x·deq(Q)ᵀ + b + s·(x Aᵀ)Bᵀ``; ``dequantized()`` returns ``deq(Q)`` as ``(out, in)``."""

    @staticmethod
    def forward(ctx, x, dequantized: Callable[[], torch.Tensor], bias, lora_a, lora_b,  # type: ignore[override]
                scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        weight = dequantized()
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        del weight
        h = torch.mm(flat, lora_a.t())
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, h, lora_a, lora_b)
        ctx.dequantized, ctx.scaling, ctx.x_shape = dequantized, scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        flat, h, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        t = torch.mm(g, lora_b) if (need_x or need_a) else None
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = torch.mm(g, ctx.dequantized())
            grad_x.addmm_(t, lora_a, alpha=s)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            grad_a = torch.mm(t.t(), flat).mul_(s)
        if need_b:
            grad_b = torch.mm(g.t(), h).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None


def can_fuse_quant(x: torch.Tensor, compute_dtype: torch.dtype, bias: torch.Tensor | None,
                   lora_a: torch.Tensor) -> bool:
    """True when :class:`FusedQuantLoRALinear` computes what the composite path would: the input,
    the factors and the bias in the layer's compute dtype, a frozen bias, no autocast."""
    return (x.dtype == compute_dtype == lora_a.dtype and x.dtype.is_floating_point and x.dim() >= 1
            and (bias is None or (bias.dtype == x.dtype and not bias.requires_grad))
            and x.device == lora_a.device
            and not (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)))
