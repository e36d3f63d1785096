r"""What training holds in memory, from shapes alone: the bytes of an assignment's tensors and
gradients (:func:`state_bytes`) and the activations one step saves for backward, traced on the
``meta`` device (:func:`saved_activation_bytes`). The estimator (:mod:`adaptopt.training.estimate`)
and the budgets (:mod:`adaptopt.training.budget`) both count with these, so they agree by
construction (docs/optimizer.md, "Planning memory before the run").
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections import Counter
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from ..layers.layout import Layout
from ..layers.lora import LoRALinear
from ..layers.trainable_flags import train_exactly
from ..modes import Mode
from .transitions import TrainRules, plan_trainable

VARIABLE = ("lora_A", "lora_B", "delta")  # a layer's tensors that exist in some states only (layers/layout.py)


def meta_copy(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer replaced by a ``meta`` tensor of its shape and
    dtype — nothing is allocated, nothing of ``model`` changes (a deep copy whose memo maps each
    tensor to its meta twin, so the weights are never copied)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy.deepcopy(model, memo)


def peak_bytes(weights: int, gradients: int, activations: int, transient: int) -> int:
    r"""The peak of one training step, ``W + O + max(A, G + g)`` with ``O = 2·G`` (AdamW's moments)
    and ``g`` the ``transient`` of :class:`StateBytes`.

    Gradients and activations do not peak together: gradients are set to ``None`` before the
    forward, so the step starts backward holding every saved activation ``A`` (with the first
    gradients of the loss) and no gradient, and ends it holding every gradient ``G`` and no
    activation — in between, a block's activations are freed as its gradients appear. Then AdamW's
    ``foreach`` kernel, one parameter group at a time, holds a temporary ``√v`` for the group's
    elements (the fused kernel, the optimizer's default where torch has one, holds none: there the
    estimate is above the peak by at most the largest group's bytes, a margin kept so that a run with
    ``foreach`` stays within its budget too), and a trained tied weight (embeddings shared with the
    output layer) gets its two gradients summed beside one another. Measured against peak resident memory:
    docs/performance.md ("The memory estimate against measured peaks")."""
    return weights + 2 * gradients + max(activations, gradients + transient)


def layouts_for(layers: Mapping[str, LoRALinear], modes: Mapping[str, tuple[Mode, int]]) -> dict[str, Layout]:
    """Each layer's layout in ``modes`` (``{name: (mode, rank)}``; factors exactly in LoRA)."""
    return {name: layers[name].layout().with_structure(mode, rank, mode is Mode.LORA)
            for name, (mode, rank) in modes.items()}


class StateBytes(NamedTuple):
    """What :func:`state_bytes` counts (bytes, and elements)."""

    weights: int
    gradients: int
    # at the end of backward, beside the gradients: AdamW's temporary for the largest optimizer group,
    # plus the second gradient of each trained tied weight (peak_bytes)
    transient: int
    trained: int


def state_bytes(model: nn.Module, layers: Mapping[str, LoRALinear], rules: TrainRules,
                layouts: Mapping[str, Layout]) -> StateBytes:
    """The model's states with its layers in ``layouts``, computed from shapes alone (nothing
    changes): ``weights`` every tensor's storage (the layers' factors and 4-bit deltas as
    ``layouts`` has them, at the layer's dtype), ``gradients`` one per trained element
    (:func:`~adaptopt.training.transitions.plan_trainable`) at its tensor's dtype, and ``transient``:
    the largest optimizer group's share of them (the optimizer keeps a group per layer and role)
    plus the trained tied weights' bytes. AdamW's moments are ``2·gradients``."""
    variable = {id(p) for m in layers.values() for n, p in m.named_parameters() if n in VARIABLE}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in variable)
    size_of = {}
    for name, layer in layers.items():
        factor_size = torch.empty((), dtype=layer._weight_dtype()).element_size()
        for tensor, spec in layer.tensor_specs(layouts[name]).items():
            n = math.prod(spec.shape)
            if tensor in VARIABLE:
                weights += n * factor_size
                size_of[f"{name}.{tensor}"] = factor_size
    params = dict(model.named_parameters())
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    trained = tied = 0
    by_group: dict[Any, int] = {}
    for pname, (role, shape) in plan_trainable(model, layers, rules, layouts).items():
        n = math.prod(shape)
        trained += n
        size = n * size_of.get(pname, params[pname].element_size() if pname in params else 4)
        by_group[role] = by_group.get(role, 0) + size
        if pname in params and uses[id(params[pname])] > 1:
            tied += size
    return StateBytes(weights, sum(by_group.values()), max(by_group.values(), default=0) + tied, trained)


def saved_activation_bytes(model: nn.Module, batch_size: int, seq_len: int, device: torch.device) -> tuple[int, int]:
    """Bytes autograd saves in one forward and its loss, each tensor once; and the logits' element count.

    The loss is the cross-entropy of the logits upcast to float32, as transformers computes it (its
    saved log-softmax counts). Each storage counts once (two nodes saving ``x`` and a view of it hold
    one tensor), and parameters' storage not at all: autograd keeps a reference (a frozen linear
    layer saves its weight for the input's gradient), not a copy."""
    seen: dict[int, int] = {}
    kept: list[torch.Tensor] = []
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # views of one tensor (x and x.t() saved by two nodes) count once
        if storage._cdata not in params and storage._cdata not in seen:
            seen[storage._cdata] = storage.nbytes()
            kept.append(t)  # keeps the storage alive, so its address stays unique while tracing
        return t

    def watch() -> contextlib.AbstractContextManager:
        seen.clear()
        kept.clear()
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    logits = traced_step(model, batch_size, seq_len, device, watch)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32
    return sum(seen.values()), int(logits.numel()) if torch.is_tensor(logits) else batch_size * seq_len * vocab


def traced_step(model: nn.Module, batch_size: int, seq_len: int, device: torch.device,
                watch: Callable[[], contextlib.AbstractContextManager], backward: bool = False) -> Any:
    """One forward of ``model`` on ``(batch_size, seq_len)`` zero tokens and its loss (the logits
    upcast to float32, as transformers computes it), in training mode and eager attention, inside
    ``watch()`` — and with ``backward``, the loss's backward inside it too. Returns the logits (or
    whatever the model returned). ``watch`` is called afresh for each way of calling the model that
    is tried, so what it counts belongs to the call that ran."""
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"  # sdpa's mask helpers read values, which meta tensors have not
    for module in model.modules():  # not model.train(): transformers' override kernelizes, refused on meta
        module.training = True
    # transformers' mask helpers read values in places a meta tensor cannot give them: causal models
    # check position ids (skipped when a mask is given), encoders check a given mask (skipped without one)
    for inputs in ({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, {"input_ids": tokens}):
        try:
            with watch():
                out = model(**inputs)
                logits = getattr(out, "logits", out)
                if torch.is_tensor(logits) and logits.is_floating_point():
                    flat = logits.reshape(-1, logits.shape[-1]).float()
                    loss = nn.functional.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long,
                                                                         device=device))
                    if backward and loss.requires_grad:
                        loss.backward()
            return logits
        except RuntimeError as err:
            if "meta" not in str(err) or "attention_mask" not in inputs:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def traced_activations(model: nn.Module, layers: Mapping[str, LoRALinear], batch_size: int, seq_len: int) -> int:
    """Activations and logits of one step that bound every assignment's, traced on a meta copy:
    every target layer in LoRA (it saves ``x`` and ``x·Aᵀ``, a FULL layer ``x``, a frozen one
    nothing) and every other parameter training (a FULL block's norms save their inputs too)."""
    twin = meta_copy(model)
    twin_layers = {name: twin.get_submodule(name) for name in layers}
    layouts = layouts_for(layers, {n: (Mode.LORA, m.rank) for n, m in layers.items()})
    for name, layout in layouts.items():
        twin_layers[name].adopt_layout(layout)
    params = dict(twin.named_parameters())
    everything = TrainRules(True, (), ())
    train_exactly(twin, [params[n] for n in plan_trainable(twin, twin_layers, everything, layouts)])
    activations, logits = saved_activation_bytes(twin, batch_size, seq_len, torch.device("meta"))
    return activations + 2 * 4 * logits
