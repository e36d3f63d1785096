"""The model a plan is made on: a ``meta`` copy of the user's model with adapters injected, the
policy's training rules and budget resolved, ready to take any assignment the policy makes.
The memory estimate (:mod:`adaptopt.training.estimate`) and the compute estimate
(:mod:`adaptopt.training.compute`) both plan on it, so they count the same model (docs/optimizer.md,
"Planning memory before the run", "Planning compute").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..layers.layout import Layout
from ..layers.lora import LoRALinear
from ..layers.quant_config import QuantConfig
from ..layers.trainable_flags import train_exactly
from ..modes import Mode
from ..policies.base import LayerDecision, LayerView, Policy, check_positive_int
from ..surgery.inject import inject_with_undo, output_adapter_target
from .budget import MemoryBudget, resolve_budget
from .memory import layouts_for, meta_copy, traced_activations
from .policy_inputs import layer_views
from .transitions import TrainRules, plan_trainable


@dataclass
class PlannedModel:
    """A meta model with adapters (``layers``), the output adapter's name (``head``: LoRA all run,
    never decided by the policy), the rules of what else trains, and the bytes a 4-bit base saves
    against its dense weight (``four_bit``, negative: 4-bit bases are counted, not built)."""

    meta: nn.Module
    layers: dict[str, LoRALinear]
    head: str | None
    rules: TrainRules
    rank: int
    four_bit: int = 0

    @classmethod
    def build(cls, model: nn.Module, policy: Policy, *, dtype: torch.dtype | None, rank: int, alpha: float,
              targets: Any, quantize: Any, gradient_checkpointing: bool, trainable: tuple[str, ...],
              memory_budget: Any, step: tuple[int, int]) -> "PlannedModel":
        """Copy ``model`` to meta (in ``dtype``), inject adapters frozen, and resolve ``memory_budget``
        onto ``policy`` (its activations: the budget's own step, else ``step`` = (batch, seq), each a
        positive int, checked before anything is built)."""
        check_positive_int("batch_size", step[0])
        check_positive_int("seq_len", step[1])
        meta = meta_copy(model)
        if dtype is not None:
            meta = meta.to(dtype)
        if gradient_checkpointing and callable(getattr(meta, "gradient_checkpointing_enable", None)):
            meta.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        head = output_adapter_target(meta, required=False) if policy.adapts_output_layer else None
        layers, _ = inject_with_undo(meta, targets, rank, alpha, mode="frozen", output_adapter=head)
        quant = quantize if quantize is not None else policy.quantize
        four_bit = 0
        if quant is not None:  # NF4/FP4: half a byte per element and an fp32 constant per block
            blocksize = QuantConfig.coerce(quant).blocksize
            for name, layer in layers.items():
                if name == head:  # the output adapter's base stays dense
                    continue
                w = layer.base.weight
                four_bit += w.numel() // 2 + 4 * (w.numel() // blocksize) - w.numel() * w.element_size()
        rules = TrainRules(policy.method == "full", tuple(trainable) + tuple(policy.trainable_extra()), ())
        if memory_budget is not None:
            spec = MemoryBudget.coerce(memory_budget)
            shape = (spec.batch_size, spec.seq_len) if spec.batch_size is not None else step
            policy.memory_budget, _ = resolve_budget(spec, meta, layers, rules, TrainRules(False, tuple(trainable), ()),
                                                     traced_activations(meta, layers, *shape), four_bit)
        return cls(meta, layers, head, rules, rank, four_bit)

    def views(self) -> dict[str, LayerView]:
        """What the policy sees of the layers it decides (all but the output adapter), every
        score the layer's size."""
        decided = {name: m for name, m in self.layers.items() if name != self.head}
        return layer_views(decided, dict.fromkeys(decided, 1.0))

    def adopt(self, decisions: Mapping[str, LayerDecision]) -> dict[str, Layout]:
        """Give every layer the tensors of its decision and make exactly what trains under it require
        gradients; returns the layouts. A layer the decisions do not name (the output adapter, a
        plan's unnamed layers) is LoRA at ``rank``, as the optimizer injects it."""
        modes = {name: (Mode.LORA, self.rank) for name in self.layers}
        modes |= {name: (d.mode, d.rank or self.rank) for name, d in decisions.items()}
        layouts = layouts_for(self.layers, modes)
        for name, layer in self.layers.items():
            layer.adopt_layout(layouts[name])
        plan = plan_trainable(self.meta, self.layers, self.rules, layouts)
        params = dict(self.meta.named_parameters())
        train_exactly(self.meta, [params[n] for n in plan])
        return layouts
