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

from ..layers.changed_marks import is_changed
from ..layers.factors import compute_dtype, svd_dense
from ..layers.lora import LoRALinear
from ..layers.sharded import gathered
from ..modes import Mode
from ..peft_arguments import task_type_of
from ..surgery.inject import output_adapter_target, require_adapters
from .atomic_files import remove_stale_temporaries, replace_directory, save_tensors, temporary_name, write_json

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- export_merged
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter layer replaced by one plain ``weight`` (and
    ``bias``) holding ``W + ΔW`` in the original layer's layout; 4-bit layers dequantized."""
    layers = require_adapters(model, "export a merged model")
    prefixes = tuple(f"{name}." for name in layers)
    state = {k: gathered(v) for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, module in layers.items():
        with torch.no_grad():
            weight = module.merged_weight()
        state[f"{name}.weight"] = weight.contiguous()
        if module.base.bias is not None:
            state[f"{name}.bias"] = gathered(module.base.bias.detach())
    return state


def export_merged(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a plain model with every update merged to ``directory``.

    Hugging Face models are written with ``save_pretrained`` (config + safetensors), so
    ``AutoModel*.from_pretrained(directory)`` loads them without adaptopt; other modules get
    ``model.safetensors``, a state dict for the original architecture. 4-bit layers are
    exported dequantized (``deq(Q) + ΔW`` in their compute dtype). The model is not changed.
    ``tokenizer`` (anything with ``save_pretrained``: a tokenizer or processor) is saved beside
    it, so ``pipeline(task, model=directory)`` works from the folder alone.

    The export is written into a fresh sibling folder and swapped in at the end
    (:func:`~adaptopt.formats.atomic_files.replace_directory`), so a crash leaves the previous export whole.
    Under FSDP2 call it on every rank: sharded tensors are gathered whole (a collective); as
    transformers' ``save_pretrained`` does, only rank 0 writes a Hugging Face model.
    """
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must have save_pretrained (a Hugging Face tokenizer or processor), "
                        f"got {type(tokenizer).__name__}")
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
        if not any(staging.iterdir()):  # save_pretrained writes on rank 0 only under torch.distributed
            shutil.rmtree(staging)
            return out
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- export_peft
def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _peft_layers(model: nn.Module, layers: Mapping[str, LoRALinear], svd: bool
                 ) -> tuple[dict[str, LoRALinear], dict[str, LoRALinear], list[str]]:
    """The layers exported exactly (LoRA factors on the unchanged base), the layers whose update
    is exported as a truncated SVD (only with ``svd``), and the owners of changed non-target
    parameters. Without ``svd``, raises ``ValueError`` listing every layer a LoRA adapter on the
    unchanged base cannot express."""
    problems, exact, approximated = [], {}, {}
    for name, m in layers.items():
        changed_base = [f"base.{n}" for n, p in m.base.named_parameters() if p.is_floating_point() and is_changed(p)]
        if m.merged:
            problem = f"{name}: merged (call unmerge() on it first)"
        elif m.mode is Mode.FULL:
            problem = f"{name}: FULL (a dense update is not a LoRA adapter)"
        elif changed_base:
            problem = f"{name}: its {' and '.join(changed_base)} changed (an update was folded in or trained)"
        else:
            problem = None
        if problem is None:
            if m.lora_A is not None:
                exact[name] = m
        elif svd:
            approximated[name] = m
        else:
            problems.append(problem)
    if problems:
        raise ValueError("export_peft writes LoRA adapters on the unchanged base model, which cannot express:\n  - "
                         + "\n  - ".join(problems[:30])
                         + "\nPass svd_rank=k (and base_model= for plain layers) to export these updates as their "
                         "best rank-k approximation, or use adaptopt.export_merged(model, dir) (a full model) or "
                         "save_adapters(model, dir).")
    if not exact and not approximated:
        raise ValueError("export_peft: no layer holds a LoRA adapter; nothing to export")
    owned = {p for m in layers.values() for p in m.parameters()}
    extra = sorted({_owner(n) for n, p in model.named_parameters()
                    if p not in owned and p.is_floating_point() and is_changed(p)})
    return exact, approximated, extra


def _update(name: str, m: LoRALinear, originals: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """The layer's whole update over the original weight, ``(out, in)``, float32 or float64."""
    if m.layout().quant is not None:
        delta = m._learned_delta()  # Q never changes: the update is the layer's own tensors
        return torch.zeros(m.out_features, m.in_features) if delta is None else delta
    key = f"{name}.weight"
    if originals is None or key not in originals:
        raise ValueError(f"export_peft(svd_rank=...): {name} changed its base weight; pass base_model= (the model "
                         "before fine-tuning, or its state dict) so the update can be computed")
    original = originals[key].detach().to(m.base.weight.device)
    original = original.T if m.fan_in_fan_out else original
    effective = m.effective_weight()
    return effective.to(compute_dtype(effective.dtype, original.dtype)) - original.to(compute_dtype(original.dtype))


def _svd_factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``B A`` = the best rank-``rank`` approximation of ``update`` (scaling 1), and the share of
    its energy ``Σ_{i≤k} σ_i² / Σ σ_i²`` kept."""
    svd = svd_dense(update)
    k = min(rank, int(svd.S.numel()))
    root = svd.S[:k].sqrt()
    total = float((svd.S ** 2).sum())
    kept = float((svd.S[:k] ** 2).sum()) / total if total > 0 else 1.0
    return root[:, None] * svd.Vh[:k], svd.U[:, :k] * root[None, :], kept


def peft_adapter(model: nn.Module, svd_rank: int | None = None, base_model: Any = None,
                 modules_to_save: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """What :func:`export_peft` writes: ``(tensors in PEFT's key layout, adapter_config, a report)``:
    a line per SVD-exported layer (the energy kept, any bias update left behind), and a line per
    changed module outside the adapted layers (a trained head, a FULL block's norms), which the
    adapter carries under ``modules_to_save`` only when asked — else it names it with its size.

    Every layer is written at scaling 1: ``B' = s·B`` (s = the layer's α/r or α/√r) and the
    config says ``lora_alpha = r`` without rsLoRA, with each layer's ``alpha_pattern`` equal to its
    ``rank_pattern``. So a loader that applies one global ``lora_alpha / r`` and ignores the
    patterns (vLLM) computes the same as PEFT, which reads them.
    """
    layers = require_adapters(model, "export a PEFT adapter")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}")
    exact, approximated, extra = _peft_layers(model, layers, svd_rank is not None)
    originals = None
    if base_model is not None:
        originals = base_model.state_dict() if isinstance(base_model, nn.Module) else dict(base_model)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: list[str] = []
    with torch.no_grad():
        for name, m in layers.items():
            if name in exact:
                dtype = compute_dtype(m.lora_B.dtype)
                factors[name] = (m.lora_A.detach(), (m.lora_B.detach().to(dtype) * m.scaling).to(m.lora_B.dtype))
            elif name in approximated:
                a, b, kept = _svd_factors(_update(name, m, originals), svd_rank)
                dtype = m._weight_dtype()
                factors[name] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
                report.append(f"{name}: rank {int(a.shape[0])} keeps {100 * kept:.2f}% of the update's energy"
                              + _bias_left_behind(name, m, originals))
    ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    params = dict(model.named_parameters())
    for owner in extra:
        owned = {pname: gathered(p.detach()) for pname, p in params.items() if _owner(pname) == owner}
        if modules_to_save:
            tensors.update({PEFT_PREFIX + pname: value for pname, value in owned.items()})
        else:
            report.append(_not_carried(owner, owned, originals))
    head = output_adapter_target(model, required=False)
    if head in factors:
        report.append(f"{head}: an adapter on the output layer (AdaptiveOptimizer's output adapter); PEFT applies it, "
                      "but vLLM refuses LoRA weights on the output layer ('unsupported LoRA weight'): to serve with "
                      "vLLM, use export_merged")
    task_type = task_type_of(model)
    if extra and not modules_to_save and task_type not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        # PEFT reads a classification task_type as "the head is in the adapter" and looks for it there
        report.append(f"task_type left empty: the trained head is not in this LoRA-only adapter, and PEFT would look "
                      f"for it under task_type {task_type!r}")
        task_type = None
    exported = [layers[n] for n in factors]
    pattern = {re.escape(n): r for n, r in ranks.items() if r != rank}
    config = {
        "peft_type": "LORA", "task_type": task_type, "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": rank, "lora_alpha": rank, "lora_dropout": max(m.layout().dropout for m in exported),
        "target_modules": sorted(factors), "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "use_rslora": False, "fan_in_fan_out": all(m.fan_in_fan_out for m in exported),
        "modules_to_save": (extra or None) if modules_to_save else None, "bias": "none", "init_lora_weights": True,
        "use_dora": False,
    }
    return tensors, config, report


def _not_carried(owner: str, owned: Mapping[str, torch.Tensor], originals: Mapping[str, torch.Tensor] | None) -> str:
    """A changed module a LoRA adapter does not carry, with how much it changed: ``‖Δ‖/‖original‖``
    per tensor (given the original model), else its norm."""
    sizes = []
    for pname, value in owned.items():
        original = None if originals is None else originals.get(pname)
        if original is None:
            sizes.append(f"{pname.rsplit('.', 1)[-1]} ‖·‖ {float(value.float().norm()):.3g}")
        else:
            change = float((value.float() - original.to(value.device).float()).norm())
            relative = 100 * change / max(float(original.float().norm()), 1e-30)
            sizes.append(f"{pname.rsplit('.', 1)[-1]} changed by {relative:.2f}%")
    return (f"{owner}: not carried by the LoRA adapter ({', '.join(sizes)}); a LoRA-only server (vLLM) would run "
            "without it. Pass modules_to_save=True to keep it for PEFT, or use export_merged")


def _bias_left_behind(name: str, m: LoRALinear, originals: Mapping[str, torch.Tensor] | None) -> str:
    """A LoRA adapter carries no bias: say how far a trained bias moved (it is not exported)."""
    bias, original = m.base.bias, None if originals is None else originals.get(f"{name}.bias")
    if bias is None or original is None or m.layout().quant is not None:
        return ""
    moved = float((gathered(bias.detach()).float() - original.to(bias.device).float()).abs().max())
    return f"; its bias moved by up to {moved:.3g}, which an adapter cannot carry" if moved > 0 else ""


def export_peft(model: nn.Module, directory: str | os.PathLike, *, svd_rank: int | None = None,
                base_model: Any = None, modules_to_save: bool = False) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory.

    ``PeftModel.from_pretrained(base_model, directory)`` and serving stacks that apply one global
    ``lora_alpha / r`` (vLLM ignores ``rank_pattern`` / ``alpha_pattern``) then compute what this
    model computes: each layer's scaling is folded into its ``B`` (:func:`peft_adapter`).

    By default the adapter holds only what a LoRA adapter can carry, so LoRA-only servers load it
    (vLLM refuses any adapter whose ``modules_to_save`` is not empty). Changed modules outside the
    adapted layers — a trained classifier head, a FULL block's norms — are then left out, and each
    is printed with how much it changed (relative to ``base_model`` when given), since a loader
    applying only the factors runs without them. ``modules_to_save=True`` keeps them under PEFT's
    ``modules_to_save`` for PEFT users.

    A LoRA adapter on the unchanged base cannot express a FULL layer, a merged one, or one whose
    base weight changed (a fold): they raise ``ValueError`` pointing to :func:`export_merged` —
    unless ``svd_rank=k`` is given, which exports each such layer's whole update as its best
    rank-``k`` approximation (truncated SVD) and prints the share of the update's energy
    ``Σ_{i≤k} σ_i² / Σ σ_i²`` kept per layer. A plain layer's update is its weight minus the
    original, so it needs ``base_model`` (the model before fine-tuning, or its state dict); a
    4-bit layer's is its own delta. A trained bias of such a layer cannot be carried by an
    adapter: the printout says how far it moved (``export_merged`` keeps it).
    """
    tensors, config, report = peft_adapter(model, svd_rank, base_model, modules_to_save)
    for line in report:
        print(f"export_peft: {line}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    write_json(out / PEFT_CONFIG_FILE, config)
    return out
