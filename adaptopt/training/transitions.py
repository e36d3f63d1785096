"""The state machine's moving parts: applying decisions, and deciding what trains.

This module is the only place that changes the optimizer's group membership or drops Adam
state; the ``requires_grad`` flags it decides are written through
:mod:`adaptopt.layers.trainable_flags`, their one writer (docs/design.md §3–§4). The path of a decision:

1. :func:`apply_decisions` checks every changing layer first (a failed check changes
   nothing), then moves each one (``LoRALinear._move``: function-preserving, checked once),
   and returns the history records;
2. :func:`plan_trainable` (pure) says which parameter trains in which group, from the layers'
   :class:`~adaptopt.layers.layout.Layout` s and the :class:`TrainRules`;
3. :func:`reconcile` makes ``requires_grad``, the groups and the Adam state follow the plan.

A layer used on its own (no optimizer) keeps its own flags in step with its mode
(:func:`adaptopt.layers.trainable_flags.sync_layer_requires_grad`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from ..layers.changed_marks import mark_changed
from ..layers.layout import Layout
from ..layers.trainable_flags import train_exactly
from ..modes import Mode
from ..name_patterns import matcher

if TYPE_CHECKING:
    from ..layers.lora import LoRALinear
    from ..policies.base import LayerDecision

Role = tuple[str, "str | None"]   # ("other", None), ("full" | "lora" | "lora_b", layer name)
OTHER: Role = ("other", None)


@dataclass(frozen=True)
class TrainRules:
    """Which parameters outside the layers' modes train (docs/design.md §4).

    - a block whose target layers are all FULL trains every parameter it holds;
    - else ``frozen`` patterns never train;
    - else ``train_other`` trains everything, or only what ``trainable`` patterns name.

    Candidates are every floating parameter outside the target layers, plus the targets'
    biases (BitFit trains them in any mode). Patterns use :mod:`adaptopt.name_patterns`.
    """

    train_other: bool = False
    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_trainable", matcher(self.trainable))
        object.__setattr__(self, "_frozen", matcher(self.frozen))

    def trains(self, name: str, full_blocks: Iterable[str]) -> bool:
        if any(name.startswith(block + ".") for block in full_blocks):
            return True
        if self._frozen(name):
            return False
        return self.train_other or self._trainable(name)


# --------------------------------------------------------------------------- layers
def apply_decisions(layers: Mapping[str, "LoRALinear"], decisions: Mapping[str, "LayerDecision"],
                    lr_scales: dict[str, float]) -> list[dict[str, Any]]:
    """Carry out ``decisions`` on ``layers`` (and ``lr_scales``); return one record per layer
    whose mode, rank or LR scale changed (``from_*`` and new values).

    Every changing layer is checked before any moves, so a refused decision (an unknown
    layer, a non-finite update) raises ``ValueError`` and
    changes nothing.
    """
    unknown = sorted(set(decisions) - set(layers))
    if unknown:
        raise ValueError(f"decisions name unknown layers {unknown[:8]}; layers are named as in opt.layers")
    changing = {name: d for name, d in decisions.items()
                if (d.mode, d.rank or layers[name].rank) != (layers[name].mode, layers[name].rank)}
    for name, decision in changing.items():
        layers[name].check_transition(decision.mode, decision.rank)
    records = []
    for name, decision in decisions.items():
        module = layers[name]
        before = (module.mode, module.rank, lr_scales[name])
        if name in changing:
            module._move(decision.mode, decision.rank or module.rank)
        if decision.lr_scale is not None:
            lr_scales[name] = float(decision.lr_scale)
        after = (module.mode, module.rank, lr_scales[name])
        if after != before:
            records.append({"layer": name, "from_mode": before[0].value, "from_rank": before[1],
                            "from_lr_scale": before[2], "mode": after[0].value, "rank": after[1],
                            "lr_scale": after[2]})
    return records


# --------------------------------------------------------------------------- the plan
def full_blocks(layers: Mapping[str, "LoRALinear"], modes: Mapping[str, Mode]) -> set[str]:
    """Blocks whose target layers are all FULL: they train every parameter they hold."""
    full, partial = set(), set()
    for name, mode in modes.items():
        target = layers[name].target
        if target is not None and target.block_name is not None:
            (full if mode is Mode.FULL else partial).add(target.block_name)
    return full - partial


def plan_trainable(model: nn.Module, layers: Mapping[str, "LoRALinear"], rules: TrainRules,
                   layouts: Mapping[str, Layout] | None = None, separate_b: bool = False
                   ) -> dict[str, tuple[Role, tuple[int, ...]]]:
    """``{parameter name: (role, shape)}`` of everything that trains when every layer has its
    layout in ``layouts`` (default: their current layouts). Pure: nothing is changed.

    A layer's trained tensors go to its ``("lora", name)`` or ``("full", name)`` role — with
    ``separate_b`` (LoRA+), ``lora_B`` to its own ``("lora_b", name)``; the parameters
    :class:`TrainRules` admits go to ``("other", None)``.
    """
    layouts = {name: m.layout() for name, m in layers.items()} if layouts is None else layouts
    plan: dict[str, tuple[Role, tuple[int, ...]]] = {}
    for name, module in layers.items():
        layout = layouts[name]
        role: Role = ("lora" if layout.mode is Mode.LORA else "full", name)
        for tensor, spec in module.tensor_specs(layout).items():
            if spec.trains:
                own = ("lora_b", name) if separate_b and role[0] == "lora" and tensor == "lora_B" else role
                plan[f"{name}.{tensor}"] = (own, spec.shape)
    blocks = full_blocks(layers, {name: layout.mode for name, layout in layouts.items()})
    owned = {p for m in layers.values() for p in m.parameters()}
    for pname, p in model.named_parameters():
        if (pname not in plan and p.is_floating_point() and (p not in owned or pname.endswith(".bias"))
                and rules.trains(pname, blocks)):
            plan[pname] = (OTHER, tuple(p.shape))
    return plan


def reconcile(model: nn.Module, optimizer: torch.optim.Optimizer, group_of_role: Mapping[Role, int],
              plan: Mapping[str, tuple[Role, Any]]) -> bool:
    """Make ``requires_grad``, group membership and Adam state follow ``plan``.

    Parameters that stay in training keep their state (and their place in their group);
    parameters that leave get ``requires_grad=False``, ``grad=None`` and no state (AdamW
    would otherwise still move them on a zero gradient through its momentum). Everything
    in a group is marked changed (:mod:`adaptopt.layers.changed_marks`). Returns whether the trained set
    (or its grouping) changed.
    """
    desired = {model.get_parameter(pname): group_of_role[role] for pname, (role, _) in plan.items()}
    groups = optimizer.param_groups
    before = [list(g["params"]) for g in groups]  # holds them, so ids stay unique
    for index, group in enumerate(groups):
        kept = []
        for p in group["params"]:
            if desired.get(p) == index:
                kept.append(p)
                del desired[p]
            else:
                optimizer.state.pop(p, None)
                p.grad = None
        group["params"] = kept
    for p, index in desired.items():
        groups[index]["params"].append(p)
    in_groups = {p for g in groups for p in g["params"]}
    mark_changed(*in_groups)
    train_exactly(model, in_groups)
    for p in model.parameters():
        if p not in in_groups:
            p.grad = None
    return [list(map(id, ps)) for ps in before] != [list(map(id, g["params"])) for g in groups]


def check_consistency(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """Verify that the trainable set, the optimizer's parameters and its state entries agree;
    return counts, or raise ``RuntimeError`` naming the parameters that disagree."""
    names = {p: n for n, p in model.named_parameters()}
    trainable = {p for p in names if p.requires_grad}
    listed = [p for g in optimizer.param_groups for p in g["params"]]
    in_groups = set(listed)
    problems = []
    if len(listed) != len(in_groups):
        problems.append("parameters listed in two groups")
    for label, bad in (("trainable but not in the optimizer", trainable - in_groups),
                       ("in the optimizer but not trainable", in_groups - trainable),
                       ("with optimizer state but not in the optimizer", set(optimizer.state) - in_groups)):
        if bad:
            problems.append(f"{label}: {sorted(names.get(p, '<not in model>') for p in bad)[:8]}")
    if problems:
        raise RuntimeError(f"AdaptiveOptimizer consistency check failed at step {step}: " + "; ".join(problems))
    return {"step": step, "trainable": len(trainable), "trainable_elements": sum(p.numel() for p in trainable),
            "state_entries": len(optimizer.state)}
