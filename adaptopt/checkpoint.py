"""Save, load and export adapted models, with safetensors only (nothing is ever unpickled).

Three formats:

- :func:`save_adapters` / :func:`load_adapters`: adaptopt's own. ``adapters.safetensors``
  holds only what differs from the base model (LoRA factors, 4-bit layers' dense deltas,
  weights that trained or had an update folded in, trained non-target parameters such as a
  classifier head); ``adapters.json`` holds every adapted layer's mode, rank, alpha,
  rsLoRA flag, dropout and 4-bit settings. Loading into a fresh base model reproduces the
  adapted model exactly (same logits).
- :func:`export_merged`: a plain model directory (Hugging Face ``save_pretrained`` layout,
  safetensors) with every update merged, loadable without adaptopt. 4-bit layers are
  exported dequantized: ``deq(Q) + ΔW`` in their compute dtype.
- :func:`export_peft`: a PEFT LoRA adapter (``adapter_config.json`` with ``rank_pattern`` /
  ``alpha_pattern`` for per-layer ranks and alphas, ``adapter_model.safetensors`` in
  PEFT's key layout), when every adapted layer is a LoRA adapter on an unchanged base.

Every loader validates names, shapes and dtypes against the model *before* touching it and
raises ``ValueError`` listing all mismatches; a failure midway puts the model back as it was.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .changes import is_changed, mark_changed
from .inject import TargetInfo, find_adapters
from .lora import LoRALinear, is_quantized_linear, linear_geometry
from .modes import Mode
from .quant import QuantConfig, QuantLoRALinear

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapters.json"
FORMAT = "adaptopt.adapters/1"
FACTOR_NAMES = ("lora_A", "lora_B", "delta")
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


# --------------------------------------------------------------------------- small helpers
def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the adapter config")
    return dtype


def _atomic_write(path: Path, write) -> None:
    """Write through ``path.tmp`` and rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    seen: dict[tuple[int, int], str] = {}
    plain = {}
    for key, t in tensors.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        plain[key] = t.clone().contiguous() if ident in seen else t.contiguous()  # tied weights: one copy each
        seen[ident] = key
    _atomic_write(path, lambda p: save_file({k: v.cpu() for k, v in plain.items()}, p, metadata=metadata))


def _adapters_or_raise(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    layers = find_adapters(model)
    if not layers:
        raise ValueError(f"cannot {action}: the model has no adapter layers (build an AdaptiveOptimizer on it or "
                         "call adaptopt.inject_adapters first)")
    return layers


def _dropout_p(module: LoRALinear) -> float:
    return float(getattr(module.dropout, "p", 0.0))


def _compute_dtype(module: LoRALinear) -> torch.dtype:
    return module._weight_dtype()


# --------------------------------------------------------------------------- save_adapters
def _layer_record(module: LoRALinear) -> dict[str, Any]:
    quant = None
    if isinstance(module, QuantLoRALinear):
        c = module.quant_config
        quant = {"quant_type": c.quant_type, "compute_dtype": _dtype_name(_compute_dtype(module)),
                 "double_quant": c.double_quant, "blocksize": c.blocksize}
    return {"mode": module.mode.value, "rank": module.rank, "alpha": module.alpha, "rslora": module.rslora,
            "dropout": _dropout_p(module), "merged": module.merged, "has_factors": module.lora_A is not None,
            "in_features": module.in_features, "out_features": module.out_features,
            "fan_in_fan_out": module.fan_in_fan_out, "quantize": quant}


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`save_adapters` writes: ``(tensors by parameter name, config)``."""
    layers = _adapters_or_raise(model, "save adapters")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        for attr in FACTOR_NAMES:
            p = getattr(module, attr, None)
            if p is not None:
                tensors[f"{name}.{attr}"] = p
    for pname, p in model.named_parameters():
        if pname not in tensors and p.is_floating_point() and is_changed(p):
            tensors[pname] = p
    config = {"format": FORMAT, "layers": {name: _layer_record(m) for name, m in layers.items()},
              "model_class": type(model).__name__}
    return tensors, config


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapters and changed weights to ``directory`` (created if needed).

    Saved: LoRA factors, 4-bit layers' dense deltas, every parameter that trained or had an
    update folded into it (see :mod:`adaptopt.changes`), and each adapted layer's mode,
    rank, alpha, rsLoRA flag, dropout and 4-bit settings. Untouched base weights are not
    saved: load into the same base model with :func:`load_adapters`. Buffers (e.g. batch-norm
    running statistics) are not saved.
    """
    tensors, config = adapter_state(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / ADAPTERS_FILE, tensors, metadata={"format": FORMAT})
    _write_json(out / CONFIG_FILE, config)
    return out


# --------------------------------------------------------------------------- load_adapters
def _read_config(directory: Path) -> dict[str, Any]:
    for name in (CONFIG_FILE, ADAPTERS_FILE):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} holds no adaptopt adapters ({name} missing): write them with "
                             "adaptopt.save_adapters(model, directory)")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("layers"), dict):
        raise ValueError(f"{directory / CONFIG_FILE} is not an adaptopt adapter config (format "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    return config


def _file_layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` from the safetensors header, without reading the data."""
    from safetensors import safe_open
    layout = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            layout[key] = (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
    return layout


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _quant_config(record: Mapping[str, Any]) -> QuantConfig | None:
    q = record.get("quantize")
    if q is None:
        return None
    return QuantConfig(q["quant_type"], _dtype(q.get("compute_dtype")), bool(q.get("double_quant", False)),
                       int(q.get("blocksize", 64)))


def _expected_for_layer(name: str, record: Mapping[str, Any], base: nn.Module,
                        problems: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
    """``{key: (shape, dtype, required)}`` of the tensors layer ``name`` can take from the file."""
    try:
        in_f, out_f, fan_in_fan_out = linear_geometry(base)
    except TypeError:
        problems.append(f"{name}: is a {type(base).__name__} here, not a linear layer")
        return {}
    if (in_f, out_f) != (record["in_features"], record["out_features"]):
        problems.append(f"{name}: saved for ({record['out_features']} × {record['in_features']}), "
                        f"the model's layer is ({out_f} × {in_f})")
        return {}
    quant = _quant_config(record)
    mode, rank = Mode.coerce(record["mode"]), int(record["rank"])
    if quant is None:
        if is_quantized_linear(base):
            problems.append(f"{name}: saved from a plain layer, but the model's layer is 4-bit")
            return {}
        dtype = base.weight.dtype
    else:
        if is_quantized_linear(base) and base.weight.quant_type != quant.quant_type:
            problems.append(f"{name}: saved over {quant.quant_type}, the model's layer is {base.weight.quant_type}")
        dtype = quant.compute_dtype or (base.compute_dtype if is_quantized_linear(base) else base.weight.dtype)
    expected: dict[str, tuple[tuple[int, ...], torch.dtype, bool]] = {}
    if record["has_factors"]:
        expected[f"{name}.lora_A"] = ((rank, in_f), dtype, True)
        expected[f"{name}.lora_B"] = ((out_f, rank), dtype, True)
    if quant is not None and mode is Mode.FULL:
        expected[f"{name}.delta"] = ((out_f, in_f), dtype, True)
    if quant is None:
        expected[f"{name}.base.weight"] = (tuple(base.weight.shape), base.weight.dtype, bool(record["merged"]))
    if base.bias is not None:
        expected[f"{name}.base.bias"] = (tuple(base.bias.shape), dtype if quant is not None else base.bias.dtype, False)
    return expected


def _plan_load(model: nn.Module, config: Mapping[str, Any], layout: Mapping[str, tuple[tuple[int, ...], str]]
               ) -> dict[str, nn.Module]:
    """Check the file against the model; return the base module of every saved layer, or raise."""
    existing = find_adapters(model)
    if existing:
        raise ValueError(f"load_adapters loads into a fresh base model, but this one already has {len(existing)} "
                         f"adapter layers (first: {next(iter(existing))!r}). Load the base model again, or resume "
                         "training with AdaptiveOptimizer.load_state_dict")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    problems: list[str] = []
    bases: dict[str, nn.Module] = {}
    expected: dict[str, tuple[tuple[int, ...], torch.dtype, bool]] = {}
    bad_layers = []
    for name, record in config["layers"].items():
        if name not in modules:
            problems.append(f"{name}: saved adapter layer, but the model has no module of that name")
            bad_layers.append(f"{name}.")
            continue
        bases[name] = modules[name]
        before = len(problems)
        expected.update(_expected_for_layer(name, record, modules[name], problems))
        if len(problems) > before:
            bad_layers.append(f"{name}.")
        if record.get("quantize") is not None:
            from ._imports import require
            require("bitsandbytes", extra="quant")
    prefixes = tuple(f"{name}." for name in config["layers"])
    for key, (shape, dtype_name) in layout.items():
        if key.startswith(tuple(bad_layers)):
            continue  # its layer is already reported
        if key in expected:
            want_shape, want_dtype, _ = expected[key]
        elif key.startswith(prefixes):
            problems.append(f"{key}: not a tensor its layer takes in the saved mode")
            continue
        elif key in params:
            want_shape, want_dtype = tuple(params[key].shape), params[key].dtype
        else:
            problems.append(f"{key}: in the file, but the model has no parameter of that name")
            continue
        if shape != want_shape:
            problems.append(f"{key}: shape {shape} in the file, {want_shape} in the model")
        elif dtype_name != _dtype_name(want_dtype):
            problems.append(f"{key}: dtype {dtype_name} in the file, {_dtype_name(want_dtype)} in the model "
                            "(convert the model with .to(dtype) first)")
    for key, (_, _, required) in expected.items():
        if required and key not in layout:
            problems.append(f"{key}: missing from the file")
    if problems:
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise ValueError(f"adapters do not match this model ({len(problems)} problems); nothing was loaded:\n  - "
                         + "\n  - ".join(problems[:30]) + more)
    return bases


def _build_layer(name: str, base: nn.Module, record: Mapping[str, Any]) -> LoRALinear:
    mode, rank = Mode.coerce(record["mode"]), int(record["rank"])
    args = (base, rank, float(record["alpha"]), float(record.get("dropout", 0.0)), bool(record["rslora"]))
    quant = _quant_config(record)
    start = Mode.LORA if record["has_factors"] else mode
    if quant is not None:
        module: LoRALinear = QuantLoRALinear(*args, mode=start, quantize=quant)
    else:
        module = LoRALinear(*args, mode=start)
    module.set_mode(mode, rank)  # LORA → FROZEN keeps a 4-bit layer's (frozen) factors
    module.target = TargetInfo.from_name(name)
    return module


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> dict[str, LoRALinear]:
    """Load what :func:`save_adapters` wrote into a fresh base model, in place; returns the
    adapter layers by name. The model then computes exactly what the saved one did.

    Raises ``ValueError`` listing every mismatch (missing layers, shapes, dtypes, unknown
    names) before anything changes; if building a layer fails midway, the model is put back.
    """
    from safetensors import safe_open
    directory = Path(directory)
    config = _read_config(directory)
    layout = _file_layout(directory / ADAPTERS_FILE)
    bases = _plan_load(model, config, layout)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    flags = {p: p.requires_grad for p in model.parameters()}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        built = {}
        for name, record in config["layers"].items():
            module = _build_layer(name, bases[name], record)
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            replaced.append((parent, child, bases[name]))
            setattr(parent, child, module)
            built[name] = module
        params.update(dict(model.named_parameters()))
        with safe_open(str(directory / ADAPTERS_FILE), framework="pt") as f, torch.no_grad():
            for key in layout:
                target = params[key]
                snapshots.append((target, target.detach().clone()))
                target.copy_(f.get_tensor(key).to(target.device))
        mark_changed(*(params[key] for key in layout))  # they differ from the base: a later save keeps them
        for name, record in config["layers"].items():
            if record["merged"]:
                if isinstance(built[name], QuantLoRALinear):
                    built[name].merge()
                else:
                    built[name].merged = True  # the saved base weight already holds the update
    except BaseException:
        with torch.no_grad():
            for target, saved in reversed(snapshots):
                target.copy_(saved)
        for parent, child, original in reversed(replaced):
            setattr(parent, child, original)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    return built


# --------------------------------------------------------------------------- export_merged
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter layer replaced by one plain ``weight`` (and
    ``bias``) holding ``W + ΔW`` in the original layer's layout; 4-bit layers dequantized."""
    layers = _adapters_or_raise(model, "export a merged model")
    prefixes = tuple(f"{name}." for name in layers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, module in layers.items():
        with torch.no_grad():
            if isinstance(module, QuantLoRALinear):
                weight = module.dense_weight().to(_compute_dtype(module))
            else:
                weight = module._to_base_layout(module.effective_weight()).to(module.base.weight.dtype)
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
    """
    state = merged_state_dict(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        model.save_pretrained(str(out), state_dict=state)
    else:
        _save_tensors(out / "model.safetensors", state, metadata={"format": "pt"})
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
    layers = _adapters_or_raise(model, "export a PEFT adapter")
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
        "r": rank, "lora_alpha": alpha, "lora_dropout": max(_dropout_p(m) for m in exported.values()),
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
    _save_tensors(out / PEFT_WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    _write_json(out / PEFT_CONFIG_FILE, config)
    return out
