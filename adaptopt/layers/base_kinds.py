"""What kind of base layer a module is: the linear-like layers adaptopt adapts (``nn.Linear``, GPT-2's
``Conv1D``, detected by duck typing so transformers is never imported) and bitsandbytes' 4-bit linear."""
from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """True for a GPT-2 ``Conv1D``: ``weight`` of shape ``(nx, nf)`` = (in, out) and an ``nf`` attribute."""
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and isinstance(getattr(module, "nf", None), int) and weight.shape[1] == module.nf)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (its weight is a packed ``Params4bit``)."""
    return isinstance(module, nn.Linear) and hasattr(module.weight, "quant_state")


def linear_geometry(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a linear-like module, or a ``TypeError``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1], True
    raise TypeError(
        f"adaptopt adapts nn.Linear and GPT-2-style Conv1D layers, not {type(module).__name__}; "
        "narrow `targets` to linear layers")
