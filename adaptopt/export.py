"""Exports for other tools, with safetensors only (docs/design.md §9).

- :func:`export_merged`: a plain model directory (Hugging Face ``save_pretrained`` layout,
  safetensors) with every update merged, loadable without adaptopt. 4-bit layers are
  exported dequantized: ``deq(Q) + ΔW`` in their compute dtype.
- :func:`export_peft`: a PEFT LoRA adapter (``adapter_config.json`` with ``rank_pattern`` /
  ``alpha_pattern`` for per-layer ranks and alphas, ``adapter_model.safetensors`` in
  PEFT's key layout), when every adapted layer is a LoRA adapter on an unchanged base.

This is the only module that knows Hugging Face's and PEFT's layouts.
"""
from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .changed_params import is_changed
from .files import remove_stale_temporaries, replace_directory, save_tensors, temporary_name, write_json
from .inject import require_adapters
from .lora import LoRALinear
from .modes import Mode

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


# --------------------------------------------------------------------------- export_merged
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter layer replaced by one plain ``weight`` (and
    ``bias``) holding ``W + ΔW`` in the original layer's layout; 4-bit layers dequantized."""
    layers = require_adapters(model, "export a merged model")
    prefixes = tuple(f"{name}." for name in layers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, module in layers.items():
        with torch.no_grad():
            weight = module.merged_weight()
        state[f"{name}.weight"] = weight.contiguous()
        if module.base.bias is not None:
            state[f"{name}.bias"] = module.base.bias.detach()
    return state


def export_merged(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a plain model with every update merged to ``directory``.

    Hugging Face models are written with ``save_pretrained`` (config + safetensors), so
    ``AutoModel*.from_pretrained(directory)`` loads them without adaptopt; other modules get
    ``model.safetensors``, a state dict for the original architecture. 4-bit layers are
    exported dequantized (``deq(Q) + ΔW`` in their compute dtype). The model is not changed.

    The export is written into a fresh sibling folder and swapped in at the end
    (:func:`~adaptopt.files.replace_directory`), so a crash leaves the previous export whole.
    """
    state = merged_state_dict(model)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot export to {out}: it is a file; pass a directory path")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, prefix=out.name)
    staging = temporary_name(out)
    staging.mkdir()
    try:
        if hasattr(model, "save_pretrained") and hasattr(model, "config"):
            model.save_pretrained(str(staging), state_dict=state)
        else:
            save_tensors(staging / "model.safetensors", state, metadata={"format": "pt"})
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- export_peft
def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _peft_layers(model: nn.Module, layers: Mapping[str, LoRALinear]) -> tuple[dict[str, LoRALinear], list[str]]:
    """The layers PEFT can represent, and the owners of changed non-target parameters; raises
    ``ValueError`` listing every layer that a LoRA adapter on the unchanged base cannot express."""
    problems, exported = [], {}
    for name, m in layers.items():
        changed_base = [f"base.{n}" for n, p in m.base.named_parameters() if p.is_floating_point() and is_changed(p)]
        if m.merged:
            problems.append(f"{name}: merged (call unmerge() on it first)")
        elif m.mode is Mode.FULL:
            problems.append(f"{name}: FULL (a dense update is not a LoRA adapter)")
        elif changed_base:
            problems.append(f"{name}: its {' and '.join(changed_base)} changed (an update was folded in or trained)")
        elif m.lora_A is not None:
            exported[name] = m
    if problems:
        raise ValueError("export_peft writes LoRA adapters on the unchanged base model, which cannot express:\n  - "
                         + "\n  - ".join(problems[:30])
                         + "\nUse adaptopt.export_merged(model, dir) (a full model) or save_adapters(model, dir).")
    if not exported:
        raise ValueError("export_peft: no layer holds a LoRA adapter; nothing to export")
    if len({m.rslora for m in exported.values()}) > 1:
        raise ValueError("export_peft: layers mix rsLoRA and plain LoRA scaling, which PEFT cannot express")
    owned = {p for m in layers.values() for p in m.parameters()}
    extra = sorted({_owner(n) for n, p in model.named_parameters()
                    if p not in owned and p.is_floating_point() and is_changed(p)})
    return exported, extra


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def peft_adapter(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`export_peft` writes: ``(tensors in PEFT's key layout, adapter_config)``."""
    layers = require_adapters(model, "export a PEFT adapter")
    exported, extra = _peft_layers(model, layers)
    rank = Counter(m.rank for m in exported.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in exported.values()).most_common(1)[0][0]
    tensors = {}
    for name, m in exported.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B
    params = dict(model.named_parameters())
    for owner in extra:
        for pname, p in params.items():
            if _owner(pname) == owner:
                tensors[PEFT_PREFIX + pname] = p
    config = {
        "peft_type": "LORA", "task_type": _task_type(model), "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": rank, "lora_alpha": alpha, "lora_dropout": max(m.layout().dropout for m in exported.values()),
        "target_modules": sorted(exported),
        "rank_pattern": {re.escape(n): m.rank for n, m in exported.items() if m.rank != rank},
        "alpha_pattern": {re.escape(n): m.alpha for n, m in exported.items() if m.alpha != alpha},
        "use_rslora": next(iter(exported.values())).rslora,
        "fan_in_fan_out": all(m.fan_in_fan_out for m in exported.values()),
        "modules_to_save": extra or None, "bias": "none", "init_lora_weights": True, "use_dora": False,
    }
    return tensors, config


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory.

    ``PeftModel.from_pretrained(base_model, directory)`` (and serving stacks that read PEFT
    adapters) then compute what this model computes. Per-layer ranks and alphas go to
    ``rank_pattern`` / ``alpha_pattern`` (exact, escaped module names); trained non-target
    modules (e.g. a classifier head) go to ``modules_to_save``. Raises ``ValueError`` if a
    layer is FULL, merged, or its base weight changed — PEFT applies adapters to the
    unchanged base — pointing to :func:`export_merged` instead.
    """
    tensors, config = peft_adapter(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    write_json(out / PEFT_CONFIG_FILE, config)
    return out
