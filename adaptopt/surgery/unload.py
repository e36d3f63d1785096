"""Model-level helpers PEFT users reach for: :func:`merge_and_unload` and :func:`disable_adapters`.

- ``merge_and_unload(model)`` puts a plain layer computing ``W + ΔW`` in place of every adapter
  layer (the original ``nn.Linear`` / ``Conv1D`` with its weight updated in place; a dense
  ``nn.Linear`` in the compute dtype for a 4-bit layer) — the in-memory twin of
  :func:`~adaptopt.export_merged`. The model no longer has adapters: an optimizer built on it is
  done with it.
- ``with disable_adapters(model):`` runs the base function of every layer whose update lives in
  tensors of its own (LoRA factors; a 4-bit layer's delta and factors), e.g. for a reference
  model in preference training. An update that already lives in the base weight — a plain layer
  trained FULL, a fold (LORA → FROZEN, a rank cut) or ``merge()`` — cannot be taken out: such
  layers are refused by name (``strict=False`` leaves them as they are and disables the rest).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..layers.changed_marks import is_changed
from ..layers.lora import LoRALinear
from .inject import require_adapters
from .swap import ModuleSwap


def plain_layer(layer: LoRALinear) -> nn.Module:
    """A plain module computing what ``layer`` computes (``W + ΔW``)."""
    with torch.no_grad():
        if layer.layout().quant is None:
            base = layer.base
            weight = layer.merged_weight()
            if weight is not base.weight:
                base.weight.copy_(weight)
            return base
        weight = layer.effective_weight().to(layer._weight_dtype())  # (out, in), whatever the original layout
        bias = layer.base.bias
        dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        # new parameters, frozen as the 4-bit base was (nothing here changes an existing parameter's flag)
        dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
        return dense


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain layer with its update merged; returns ``model``.
    Every layer's update is checked (finite) before any is touched."""
    layers = require_adapters(model, "merge and unload")
    for layer in layers.values():
        layer._check_finite(None if layer.merged else layer._learned_delta(), "merge")
    swap = ModuleSwap(model)
    for name, layer in layers.items():
        swap.put(name, plain_layer(layer), follow_training=True)
    return model


def update_in_weight(layer: LoRALinear) -> bool:
    """Does part of the layer's update live in its base weight (so the base function is lost)?"""
    if layer.layout().quant is not None:
        return False  # Q is never written
    return (layer.merged and layer.lora_A is not None) or is_changed(layer.base.weight)


@contextmanager
def disable_adapters(model: nn.Module, strict: bool = True) -> Iterator[None]:
    """Within the block, adapter layers compute their base function only (see the module text)."""
    layers = require_adapters(model, "disable adapters")
    kept = sorted(name for name, layer in layers.items() if update_in_weight(layer))
    if kept and strict:
        raise ValueError(f"cannot disable the adapters of {kept[:5]}{' …' if len(kept) > 5 else ''}: their update "
                         "lives in the base weight (trained FULL, folded, or merged), so the base model cannot be "
                         "recovered from them; pass strict=False to disable the others only")
    switched = [layer for name, layer in layers.items() if name not in kept]
    for layer in switched:
        layer.adapters_disabled = True
    try:
        yield
    finally:
        for layer in switched:
            layer.adapters_disabled = False
