r"""How much memory a fine-tune needs, per policy, before renting the GPU (docs/optimizer.md).

:func:`estimate_memory` builds nothing real: the model may live on the ``meta`` device (an 8B
config costs no memory). For a policy it takes the assignment where the policy trains the most
(:meth:`Policy.peak_assignment` — Hybrid's FULL blocks, LISA's sampled ones, ...; Hybrid's output
adapter, and a tied head's own copy of the weight, with them) and adds up

.. math::  M = W + O + \max(A + L,\ G + g)

(:func:`~adaptopt.training.memory.peak_bytes` says why the gradients and activations do not add up)

- ``W``: every weight at its storage dtype (a 4-bit base: half a byte per element plus its block
  constants, 4 bytes per ``blocksize``);
- ``G``: one gradient per trained element, in the parameter's dtype; ``g`` the temporaries beside
  them at the end of backward (AdamW's ``√v`` for the largest optimizer group — it updates one group
  at a time — and a trained tied weight's second gradient);
- ``O``: AdamW's two moments per trained element, in the parameter's dtype (as ``torch.optim.AdamW``
  keeps them);
- ``A``: the activations autograd saves for backward, *traced*: one forward of the adapted model and
  its loss (cross-entropy over float32 logits, as transformers computes it) on ``(batch, seq)`` meta
  inputs under ``saved_tensors_hooks`` counts the bytes of every tensor saved (each tensor once;
  saved parameters are references, not copies, and do not count), so a frozen prefix, LoRA's fused
  node (it keeps ``x`` and ``x·Aᵀ``), the loss's log-softmax and gradient checkpointing are all seen
  as they are (attention is traced eagerly: transformers' SDPA mask helpers read values, which meta
  tensors have not — so the attention weights count, as they do on CPU, where flash attention would
  not keep them);
- ``L``: the first two gradients of backward, of the log-softmax and of the logits,
  ``2·batch·seq·vocab`` floats: they live beside all of ``A``.

Each term is counted by :mod:`adaptopt.training.memory`. What it leaves out is stated, not guessed:
the allocator's fragmentation and cached blocks, a CUDA context, the Python process itself (a CPU
run's resident memory adds torch's and transformers' own ~0.3–0.6 GB). A mixed-precision step
(``autocast=``) is traced in the 16-bit dtype, plus autocast's copies of the multiplied matrices.
Its accuracy against measured peaks: docs/performance.md, row 8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..layers.quant_config import QuantConfig
from ..layers.trainable_flags import train_exactly
from ..policies import build_policy
from ..surgery.inject import DEFAULT_ALPHA, DEFAULT_RANK, inject_with_undo, output_adapter_target
from .arguments import TASK_HEADS
from .budget import MemoryBudget, resolve_budget
from .memory import layouts_for, meta_copy, peak_bytes, saved_activation_bytes, state_bytes, traced_activations
from .policy_inputs import layer_views
from .transitions import TrainRules, plan_trainable


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component (see the module docstring) and their total."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    trained_elements: int
    transient: int = 0  # the end of backward's temporaries (training/memory.py, StateBytes)

    @property
    def total(self) -> int:
        return peak_bytes(self.weights, self.gradients, self.activations + self.logits, self.transient)

    def row(self) -> dict[str, float]:
        """The components in GB, as the plan table prints them."""
        gb = 1e9
        return {"weights": self.weights / gb, "gradients": self.gradients / gb, "optimizer": self.optimizer / gb,
                "activations": self.activations / gb, "logits": self.logits / gb, "total": self.total / gb}


def estimate_memory(model: nn.Module, policy: Any = "hybrid", batch_size: int = 8, seq_len: int = 512, *,
                    dtype: torch.dtype | None = None, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
                    targets: Any = "auto", quantize: Any = None, gradient_checkpointing: bool = False,
                    trainable: tuple[str, ...] = TASK_HEADS, memory_budget: Any = None,
                    autocast: torch.dtype | None = None) -> MemoryEstimate:
    """The peak training memory of ``model`` under ``policy`` (bytes, by component; the module
    docstring has the formula), with its weights in ``dtype`` (default: as they are). ``model`` is
    copied to the ``meta`` device first (nothing is allocated; build big models there:
    ``with torch.device("meta"): AutoModelForCausalLM.from_config(config)``). Gradients and AdamW's
    moments take the parameters' dtype, as ``torch.optim.AdamW`` keeps them. With ``memory_budget``
    (as ``AdaptiveOptimizer`` takes it; without its own step, the activations of this
    ``batch_size × seq_len`` count against it) a policy that spends budgets plans within it.

    ``autocast=torch.bfloat16`` (or float16) estimates a mixed-precision step: weights, gradients
    and moments stay in ``dtype`` (the 32-bit masters), the activations are traced in the 16-bit
    dtype (as autocast keeps them; the loss is still computed in float32), and every matrix a layer
    multiplies has a 16-bit copy saved for backward (autocast casts it for the product)."""
    for label, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    policy = build_policy(policy)
    meta = meta_copy(model)
    if dtype is not None:
        meta = meta.to(dtype)
    if gradient_checkpointing and callable(getattr(meta, "gradient_checkpointing_enable", None)):
        meta.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = output_adapter_target(meta, required=False) if policy.adapts_output_layer else None
    # 4-bit bases are counted, not built; the output adapter is LoRA all run
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
    user_rules = TrainRules(False, tuple(trainable), ())
    rules = TrainRules(policy.method == "full", tuple(trainable) + tuple(policy.trainable_extra()), ())
    if memory_budget is not None:
        spec = MemoryBudget.coerce(memory_budget)  # its activations: its own step's, else this estimate's
        step = (spec.batch_size, spec.seq_len) if spec.batch_size is not None else (batch_size, seq_len)
        policy.memory_budget, _ = resolve_budget(spec, meta, layers, rules, user_rules,
                                                 traced_activations(meta, layers, *step), four_bit)
    decided = {name: m for name, m in layers.items() if name != head}  # the output adapter: LoRA all run
    decisions = policy.peak_assignment(layer_views(decided, dict.fromkeys(decided, 1.0)))
    layouts = layouts_for(layers, {name: (d.mode, d.rank or rank) for name, d in decisions.items()})
    layouts = {name: layouts.get(name, m.layout()) for name, m in layers.items()}
    for name, layer in layers.items():
        layer.adopt_layout(layouts[name])
    plan = plan_trainable(meta, layers, rules, layouts)
    params = dict(meta.named_parameters())
    train_exactly(meta, [params[n] for n in plan])
    states = state_bytes(meta, layers, rules, layouts)
    traced = meta if autocast is None else meta_copy(meta).to(autocast)
    activations, logits = saved_activation_bytes(traced, batch_size, seq_len, torch.device("meta"))
    if autocast is not None:
        activations += cast_copies(meta, autocast)
    return MemoryEstimate(states.weights + four_bit, states.gradients, 2 * states.gradients, activations,
                          2 * 4 * logits, states.trained, states.transient)


def cast_copies(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the ``dtype`` copies autocast makes of the matrices a step multiplies: every linear
    layer's weight (a tied one once) and LoRA factors, kept for backward."""
    seen = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            seen[id(module.weight)] = module.weight.numel()
        for name in ("lora_A", "lora_B"):
            factor = getattr(module, name, None)
            if isinstance(factor, torch.Tensor):
                seen[id(factor)] = factor.numel()
    return sum(seen.values()) * torch.empty((), dtype=dtype).element_size()


def plan_table(estimates: Mapping[str, MemoryEstimate]) -> str:
    """One row per policy, GB per component, the way ``adaptopt plan`` prints it."""
    lines = ["| policy | weights | gradients | optimizer | activations | logits | total (GB) | trained |",
             "|---|---|---|---|---|---|---|---|"]
    for name, estimate in estimates.items():
        r = estimate.row()
        lines.append(f"| {name} | {r['weights']:.3g} | {r['gradients']:.3g} | {r['optimizer']:.3g} | "
                     f"{r['activations']:.3g} | {r['logits']:.3g} | **{r['total']:.3g}** | "
                     f"{estimate.trained_elements / 1e6:.3g}M |")
    return "\n".join(lines)
