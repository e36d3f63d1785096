r"""One autograd node for a LoRA layer over a frozen linear base.

.. math::  y = x W^\top + b + s\,(x A^\top) B^\top

Forward: the base GEMM, then ``h = x Aᵀ`` (``N × r``) and ``y += s·h Bᵀ`` accumulated inside
the second GEMM (no separate scale and add over ``N × out``). Backward, with ``g = ∂L/∂y``
and ``t = g B`` (``N × r``):

.. math::  \partial_B = s\, g^\top h,\qquad \partial_A = s\, t^\top x,\qquad
           \partial_x = g W + s\, t A

where ``∂_x`` is one GEMM into which ``s·tA`` is accumulated in place. The frozen base gets
no weight-gradient GEMM, and only ``x`` and the small ``h`` are saved. Written against the
composite path (``base(x) + s·B(A(x))``), this removes four elementwise passes over
``N × out`` / ``N × in`` tensors per layer and one autograd node; the arithmetic is the same
up to the order of float additions.

Used only where it is exact to do so (see :func:`can_fuse`): no dropout, no autocast, one
dtype, frozen base; everything else takes the composite path.
"""
from __future__ import annotations

import torch


class FusedLoRALinear(torch.autograd.Function):
    """``y = x Wᵀ + b + s·(x Aᵀ)Bᵀ`` (``W`` given as ``(in, out)`` when ``fan_in_fan_out``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, fan_in_fan_out: bool):  # type: ignore[override]
        flat = x.reshape(-1, x.shape[-1])
        weight_t = weight if fan_in_fan_out else weight.t()
        out = torch.mm(flat, weight_t) if bias is None else torch.addmm(bias, flat, weight_t)
        h = torch.mm(flat, lora_a.t())
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, h, weight, lora_a, lora_b)
        ctx.scaling, ctx.fan_in_fan_out, ctx.x_shape = scaling, fan_in_fan_out, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        flat, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        t = torch.mm(g, lora_b) if (need_x or need_a) else None
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = torch.mm(g, weight.t() if ctx.fan_in_fan_out else weight)
            grad_x.addmm_(t, lora_a, alpha=s)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            grad_a = torch.mm(t.t(), flat).mul_(s)
        if need_b:
            grad_b = torch.mm(g.t(), h).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None, None


def can_fuse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor) -> bool:
    """True when :class:`FusedLoRALinear` computes exactly what the composite path would:
    frozen base, one floating dtype and device, no autocast, a plain (non-sharded) weight."""
    return (not weight.requires_grad and (bias is None or not bias.requires_grad)
            and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and x.dtype == weight.dtype == lora_a.dtype and x.dtype.is_floating_point
            and (bias is None or bias.dtype == x.dtype)
            and x.device == weight.device and x.dim() >= 1
            and not (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)))
