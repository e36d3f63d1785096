r"""The optimizer's param groups: a fixed layout, and each layer's LR scale applied to its groups.

Param groups never change in number: group 0 holds the non-target parameters that train
("other"); every target layer has a "full" group (its weight / dense delta and bias, lr = ``lr``)
and a "lora" group (its factors, lr = ``lora_lr``) — with LoRA+ also a "lora_b" group at
``ratio × lora_lr`` — any of them possibly empty. A scheduler built once at the start therefore
schedules every layer, including layers promoted later. A layer's LR scale multiplies its groups'
scheduled lr during the update only:

.. math::  \mathrm{lr}_{\text{effective}}(\ell)
           = \mathrm{lr}_{\text{scheduled}}(\text{group}) \cdot \mathrm{scale}_\ell
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

Role = tuple[str, "str | None"]  # (kind, layer name); ("other", None) for group 0


def layer_groups(layers: Iterable[str], lr: float, lora_lr: float,
                 lora_plus_ratio: float | None) -> tuple[list[Role], list[dict[str, Any]]]:
    """The roles and the (empty) param groups of the layout above, in the same order."""
    roles: list[Role] = [("other", None)]
    groups: list[dict[str, Any]] = [{"params": [], "lr": lr}]
    for name in layers:
        roles += [("full", name), ("lora", name)]
        groups += [{"params": [], "lr": lr}, {"params": [], "lr": lora_lr}]
        if lora_plus_ratio is not None:  # LoRA+: B in its own group, at ratio × lora_lr
            roles.append(("lora_b", name))
            groups.append({"params": [], "lr": lora_lr * lora_plus_ratio})
    return roles, groups


@contextmanager
def scaled_lrs(groups: Sequence[dict[str, Any]], roles: Sequence[Role], scales: Mapping[str, float]) -> Iterator[None]:
    """Within the block, each layer's groups run at ``lr × scale`` of their layer; the scheduled
    lrs are put back after it, whatever happens inside."""
    scaled = []
    for group, (_, layer) in zip(groups, roles):
        scale = scales[layer] if layer is not None else 1.0
        if scale != 1.0:
            scaled.append((group, group["lr"]))
            group["lr"] = group["lr"] * scale
    try:
        yield
    finally:
        for group, lr in scaled:
            group["lr"] = lr
