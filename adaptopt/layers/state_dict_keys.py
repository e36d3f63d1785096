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
