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
  them at the end of backward (``foreach`` AdamW's ``√v`` for the largest optimizer group — it updates
  one group at a time; a margin under the default fused kernel — and a trained tied weight's second
  gradient);
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

from ..policies import build_policy
from ..surgery.inject import DEFAULT_ALPHA, DEFAULT_RANK
from .arguments import TASK_HEADS
from .memory import meta_copy, peak_bytes, saved_activation_bytes, state_bytes
from .planned_model import PlannedModel


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
    policy = build_policy(policy)
    planned = PlannedModel.build(model, policy, dtype=dtype, rank=rank, alpha=alpha, targets=targets,
                                 quantize=quantize, gradient_checkpointing=gradient_checkpointing,
                                 trainable=trainable, memory_budget=memory_budget, step=(batch_size, seq_len))
    layouts = planned.adopt(policy.peak_assignment(planned.views()))
    meta, layers, rules, four_bit = planned.meta, planned.layers, planned.rules, planned.four_bit
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


def plan_table(estimates: Mapping[str, MemoryEstimate], compute: Mapping[str, float] | None = None) -> str:
    """One row per policy, GB per component, the way ``adaptopt plan`` prints it; with ``compute``
    (each policy's FLOPs per step over LoRA's, :func:`~adaptopt.training.compute.relative_compute`)
    a column of those too."""
    extra = ("", "") if compute is None else (" FLOPs / LoRA |", "---|")
    lines = ["| policy | weights | gradients | optimizer | activations | logits | total (GB) | trained |" + extra[0],
             "|---|---|---|---|---|---|---|---|" + extra[1]]
    for name, estimate in estimates.items():
        r = estimate.row()
        flops = "" if compute is None else f" {compute[name]:.2f} |"
        lines.append(f"| {name} | {r['weights']:.3g} | {r['gradients']:.3g} | {r['optimizer']:.3g} | "
                     f"{r['activations']:.3g} | {r['logits']:.3g} | **{r['total']:.3g}** | "
                     f"{estimate.trained_elements / 1e6:.3g}M |{flops}")
    return "\n".join(lines)
