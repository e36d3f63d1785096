"""How an adapter layer appears in its model's ``state_dict()``: under the plain layer's names.

A model with adapters is saved by code that knows nothing of adaptopt (``Trainer`` checkpoints,
``save_pretrained``, Lightning, ``torch.save``) and loaded by code that knows nothing of it
either (``AutoModel*.from_pretrained``). So each adapter layer writes its tensors under the
names the original ``nn.Linear`` had (docs/design.md §9):

=====================================  =========================================================
layer                                  keys under the layer's prefix
=====================================  =========================================================
no factors (FROZEN, FULL)              ``weight``, ``bias`` — the base tensors themselves
LoRA factors, unmerged                 ``weight`` = ``W + s·BA`` (a copy, for plain loaders),
                                       ``base.weight`` = ``W`` (exact), ``bias``, ``lora_A``, ``lora_B``
LoRA factors, merged (``merge()``)     ``weight`` (already ``W + s·BA``), ``bias``, ``lora_A``, ``lora_B``
4-bit (``QuantLoRALinear``)            ``weight`` (packed NF4/FP4) and its ``weight.<quant state>``,
                                       ``bias``, ``delta``, ``lora_A``, ``lora_B``
=====================================  =========================================================

A plain model therefore loads the trained function from any of these (the adapter keys are
reported as unexpected and ignored), except a 4-bit one: its packed ``weight`` does not fit a
dense layer, so the load stops with a size-mismatch error instead of running on random
weights. Loading back into an adapted model is exact: ``base.weight`` is used where present, the
copy is dropped, and the structure (factors of the saved rank, or none) is taken from the keys.
State dicts written before this format (``base.weight``, ``base.bias`` always) load unchanged.
"""
from __future__ import annotations

from typing import Any, MutableMapping

import torch

from .layout import implied_by_state_dict
from .sharded import is_sharded, shard_like

BASE = "base."


def write_plain_names(layer: Any, state_dict: MutableMapping[str, Any], prefix: str, _metadata: Any) -> None:
    """``state_dict`` post-hook of an adapter layer: move its base's keys to the plain names
    (the table above). The copy ``W + s·BA`` is made only for unmerged plain factors."""
    effective = layer._state_dict_effective_weight()
    for key in [k for k in state_dict if k.startswith(prefix + BASE)]:
        plain = prefix + key[len(prefix) + len(BASE):]
        if effective is not None and plain == prefix + "weight":
            continue  # W stays under base.weight; the plain name gets W + s·BA
        state_dict[plain] = state_dict.pop(key)
    if effective is not None:
        state_dict[prefix + "weight"] = effective


def read_plain_names(state_dict: MutableMapping[str, Any], prefix: str) -> bool | None:
    """Undo :func:`write_plain_names` in a layer's slice of a state dict being loaded, so its
    base module finds its own keys. Returns whether ``weight`` held an update merged into it
    (factors present, no separate ``base.weight``) — for plain layers; ``None`` for a state dict
    in the earlier format, which does not say."""
    has_base, has_plain = prefix + BASE + "weight" in state_dict, prefix + "weight" in state_dict
    has_factors = prefix + "lora_A" in state_dict
    if has_base and has_plain and not has_factors:
        # saved without factors, so the plain names hold the base tensors; base.* entries beside them
        # were filled in by a loader that keys on parameter names (torch.distributed.checkpoint's
        # set_model_state_dict adds the model's current values under them): drop those
        for key in [k for k in state_dict if k.startswith(prefix + BASE)]:
            del state_dict[key]
        merged = False
    elif has_base:
        merged = None if state_dict.pop(prefix + "weight", None) is None else False
    else:
        merged = has_plain and has_factors
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        if name.split(".", 1)[0] in ("weight", "bias"):
            state_dict[prefix + BASE + name] = state_dict.pop(key)
    return merged


def holds_full_layer_state(state_dict: MutableMapping[str, Any], prefix: str) -> bool:
    """Does the state dict describe the whole layer (its weight, under either name), so its
    structure can be inferred from the keys? A partial one leaves the structure alone."""
    return prefix + "weight" in state_dict or prefix + BASE + "weight" in state_dict


def take_saved_structure(layer: Any, state_dict: MutableMapping[str, Any], prefix: str) -> None:
    """Before an adapter layer loads its slice of a state dict: read the plain names
    (:func:`read_plain_names`), take the structure a full state dict of the layer describes
    (factors of its rank, or none; a 4-bit layer's dense delta), and split whole tensors into this
    rank's rows where the layer is sharded by FSDP2.

    This is what lets ``model.load_state_dict`` (and the HF Trainer's resume) load a checkpoint
    saved after transitions into a model still in its initial modes. Only the structure is inferred
    (:func:`~adaptopt.layers.layout.implied_by_state_dict`); the optimizer's ``load_state_dict``
    restores the exact modes. A partial state dict (without the weight) leaves the structure alone.
    """
    if holds_full_layer_state(state_dict, prefix):
        plain_only = not any(key[len(prefix):].split(".")[0] in ("base", "lora_A", "lora_B", "delta")
                             for key in state_dict if key.startswith(prefix))
        merged = read_plain_names(state_dict, prefix)
        a = state_dict.get(prefix + "lora_A")
        if plain_only and layer.keep_structure_on_plain_load and layer.layout().has_factors:
            # a plain folder (W + s·BA under the plain name, as the Trainer resumes one): the layer keeps
            # its structure — what trains, and a DDP built on it, stay as they are — with its update set
            # to zero, which computes exactly the loaded weight; the sidecar and the optimizer's state
            # restore the rest
            layer.unmerge()
            state_dict[prefix + "lora_A"] = layer.lora_A.detach()
            state_dict[prefix + "lora_B"] = torch.zeros_like(layer.lora_B)
        else:
            layer.adopt_layout(implied_by_state_dict(layer.layout(), None if a is None else int(a.shape[0]),
                                                     prefix + "delta" in state_dict))
        if merged is not None and layer._merge_lives_in_weight:
            layer.merged = merged and layer.lora_A is not None
    for name, p in layer.named_parameters():  # FSDP2: a whole tensor loads as this rank's rows
        key = prefix + name
        if is_sharded(p) and key in state_dict and not is_sharded(state_dict[key]):
            state_dict[key] = shard_like(p, state_dict[key].to(p.device))
