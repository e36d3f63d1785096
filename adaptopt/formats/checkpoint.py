"""adaptopt's own checkpoint format: :func:`save_adapters` / :func:`load_adapters`, with
safetensors only (nothing is ever unpickled). The exports for other tools (a merged model,
a PEFT adapter) are in :mod:`adaptopt.formats.export`; the formats are described in
docs/design.md §9.

``adapters.<id>.safetensors`` holds only what differs from the base model (LoRA factors, 4-bit
layers' dense deltas, weights that trained or had an update folded in, trained non-target
parameters such as a classifier head); ``adapters.json`` holds every adapted layer's
:class:`~adaptopt.layers.layout.Layout` record (mode, rank, alpha, rsLoRA flag, dropout, 4-bit
settings, factors, merged) and its geometry, and names the tensor file with its SHA-256 — it
is the commit point of a save (see :func:`save_adapters`). Loading into a fresh base model
reproduces the adapted model exactly (same logits).

The loader validates names, shapes and dtypes against the model *before* touching it and
raises ``ValueError`` listing all mismatches; a failure midway puts the model back as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..layers.base_kinds import is_quantized_linear, linear_geometry
from ..layers.changed_marks import is_changed, mark_changed
from ..layers.layout import Layout, dtype_name
from ..layers.lora import LoRALinear
from ..layers.sharded import gathered
from ..surgery.inject import build_layer, find_adapters, require_adapters
from ..surgery.output_adapter import tied_partners, untie_config, with_own_weight
from ..surgery.swap import ModuleSwap
from .atomic_files import folder_lock, remove_stale_temporaries, save_tensors, write_json

ADAPTERS_FILE = "adapters.safetensors"  # the tensor file of folders written before saves were versioned
TENSOR_FILE = re.compile(r"adapters(\.[0-9a-f]+)?\.safetensors")
RECORD_KEYS = ("mode", "rank", "in_features", "out_features")
CONFIG_FILE = "adapters.json"
FORMAT = "adaptopt.adapters/1"
FACTOR_NAMES = ("lora_A", "lora_B", "delta")


# --------------------------------------------------------------------------- save_adapters
def _layer_record(module: LoRALinear) -> dict[str, Any]:
    source = {"weight_source": module.weight_source} if module.weight_source is not None else {}
    return {**module.layout().to_record(), "in_features": module.in_features, "out_features": module.out_features,
            "fan_in_fan_out": module.fan_in_fan_out, **source}


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`save_adapters` writes: ``(tensors by parameter name, config)``."""
    layers = require_adapters(model, "save adapters")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        for attr in FACTOR_NAMES:
            p = getattr(module, attr, None)
            if p is not None:
                tensors[f"{name}.{attr}"] = p
    for pname, p in model.named_parameters():
        if pname not in tensors and p.is_floating_point() and is_changed(p):
            tensors[pname] = gathered(p)  # FSDP2: the whole tensor (a collective: every rank calls)
    config = {"format": FORMAT, "layers": {name: _layer_record(m) for name, m in layers.items()},
              "model_class": type(model).__name__}
    return tensors, config


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapters and changed weights to ``directory`` (created if needed).

    Saved: LoRA factors, 4-bit layers' dense deltas, every parameter that trained or had an
    update folded into it (see :mod:`adaptopt.layers.changed_marks`), and each adapted layer's mode,
    rank, alpha, rsLoRA flag, dropout and 4-bit settings. Untouched base weights are not
    saved: load into the same base model with :func:`load_adapters`. Buffers (e.g. batch-norm
    running statistics) are not saved.

    A save is one atomic step: the tensors go to a new ``adapters.<id>.safetensors``, then
    ``adapters.json`` — which names that file and its SHA-256 — replaces the old one by a
    rename, and only then is the previous tensor file deleted. A crash at any moment leaves
    a folder that loads as the previous save or as this one. Processes saving into one folder
    take turns; temporaries of killed saves are removed by the next save.

    Under FSDP2 call it on every rank: sharded weights are gathered whole (a collective), and
    every rank then writes the same folder in turn, as under DDP.
    """
    tensors, config = adapter_state(model)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot save adapters to {out}: it is a file; pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        remove_stale_temporaries(out)
        name = f"adapters.{secrets.token_hex(6)}.safetensors"
        save_tensors(out / name, tensors, metadata={"format": FORMAT})
        config["tensors"] = {"file": name, "sha256": _sha256(out / name), "bytes": (out / name).stat().st_size}
        write_json(out / CONFIG_FILE, config)  # the commit point
        for old in out.glob("adapters*.safetensors"):
            if old.name != name:
                old.unlink()
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- load_adapters
def adapters_file(directory: str | os.PathLike) -> Path:
    """The tensor file the adapters in ``directory`` use (named in ``adapters.json``;
    ``adapters.safetensors`` in folders written before saves were versioned)."""
    directory = Path(directory)
    return directory / _tensor_entry(_read_config(directory), directory / CONFIG_FILE)["file"]


def _tensor_entry(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    entry = config.get("tensors", {"file": ADAPTERS_FILE})
    name = entry.get("file") if isinstance(entry, Mapping) else None
    if not isinstance(name, str) or not TENSOR_FILE.fullmatch(name):
        raise ValueError(f"{path}: 'tensors.file' must name an adapters*.safetensors file in the same folder, "
                         f"got {name!r}; the folder is damaged: save the adapters again")
    return dict(entry)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds no adaptopt adapters ({CONFIG_FILE} missing): write them with "
                         "adaptopt.save_adapters(model, directory)")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): it is damaged or not an "
                         "adaptopt adapter config; save the adapters again") from None
    except json.JSONDecodeError as exc:
        what = "empty" if not path.read_bytes().strip() else f"not valid JSON ({exc.msg}, line {exc.lineno})"
        raise ValueError(f"{path} is {what}: it is damaged or not an adaptopt adapter config; save the adapters "
                         "again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("layers"), dict):
        raise ValueError(f"{path} is not an adaptopt adapter config (format "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})")
    missing = sorted({f"{name}.{key}" for name, record in config["layers"].items() for key in RECORD_KEYS
                      if not isinstance(record, Mapping) or key not in record})
    if missing:
        raise ValueError(f"{path}: layer records lack {missing[:8]}: the file is damaged or was not written by "
                         "adaptopt.save_adapters; save the adapters again")
    return config


def _verified_tensor_file(directory: Path, config: Mapping[str, Any]) -> Path:
    entry = _tensor_entry(config, directory / CONFIG_FILE)
    path = directory / entry["file"]
    if not path.is_file():
        raise ValueError(f"{directory} holds no adaptopt adapters ({entry['file']} missing, named by "
                         f"{CONFIG_FILE}): write them with adaptopt.save_adapters(model, directory)")
    if "sha256" in entry and _sha256(path) != entry["sha256"]:
        raise ValueError(f"{path} does not match the checksum in {CONFIG_FILE}: the file is damaged; "
                         "save the adapters again")
    return path


def _file_layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` from the safetensors header, without reading the data."""
    from safetensors import SafetensorError, safe_open
    layout = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                layout[key] = (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): it is damaged; save the adapters "
                         "again") from None
    return layout


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _layout_of(name: str, record: Mapping[str, Any], problems: list[str]) -> Layout | None:
    try:
        return Layout.from_record(record)
    except (KeyError, ValueError, TypeError) as exc:
        problems.append(f"{name}: malformed layer record in the adapter config ({type(exc).__name__}: {exc})")
        return None


def _expected_for_layer(name: str, record: Mapping[str, Any], base: nn.Module,
                        problems: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
    """``{key: (shape, dtype, required)}`` of the tensors layer ``name`` can take from the file:
    those its saved :class:`~adaptopt.layers.layout.Layout` implies. Factors and deltas are always
    saved; a plain base weight only when it changed (always when an adapter was merged into it)."""
    try:
        in_f, out_f, _ = linear_geometry(base)
    except TypeError:
        problems.append(f"{name}: is a {type(base).__name__} here, not a linear layer")
        return {}
    if (in_f, out_f) != (record["in_features"], record["out_features"]):
        problems.append(f"{name}: saved for ({record['out_features']} × {record['in_features']}), "
                        f"the model's layer is ({out_f} × {in_f})")
        return {}
    layout = _layout_of(name, record, problems)
    if layout is None:
        return {}
    quant = layout.quant
    if quant is None:
        if is_quantized_linear(base):
            problems.append(f"{name}: saved from a plain layer, but the model's layer is 4-bit")
            return {}
        dtype = bias_dtype = base.weight.dtype
        bias_dtype = base.bias.dtype if base.bias is not None else dtype
    else:
        if is_quantized_linear(base) and base.weight.quant_type != quant.quant_type:
            problems.append(f"{name}: saved over {quant.quant_type}, the model's layer is {base.weight.quant_type}")
        dtype = bias_dtype = quant.compute_dtype or (base.compute_dtype if is_quantized_linear(base)
                                                     else base.weight.dtype)
    weight_shape = None if quant is not None else tuple(base.weight.shape)
    expected: dict[str, tuple[tuple[int, ...], torch.dtype, bool]] = {}
    for tensor, spec in layout.tensors(in_f, out_f, weight_shape, base.bias is not None).items():
        if spec.kind in ("factor", "delta"):
            expected[f"{name}.{tensor}"] = (spec.shape, dtype, True)
        elif spec.kind == "weight":
            expected[f"{name}.{tensor}"] = (spec.shape, base.weight.dtype, layout.merged and layout.has_factors)
        else:
            expected[f"{name}.{tensor}"] = (spec.shape, bias_dtype, False)
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
        if isinstance(record, Mapping) and record.get("quantize") is not None:
            from .._imports import require
            require("bitsandbytes", extra="quant")
    prefixes = tuple(f"{name}." for name in config["layers"])
    for key, (shape, file_dtype) in layout.items():
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
        elif file_dtype != dtype_name(want_dtype):
            problems.append(f"{key}: dtype {file_dtype} in the file, {dtype_name(want_dtype)} in the model "
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
    return build_layer(base, Layout.from_record(record), name)


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> dict[str, LoRALinear]:
    """Load what :func:`save_adapters` wrote into a fresh base model, in place; returns the
    adapter layers by name. The model then computes exactly what the saved one did.

    Raises ``ValueError`` listing every mismatch (missing layers, shapes, dtypes, unknown
    names) before anything changes; if building a layer fails midway, the model is put back.
    """
    from safetensors.torch import load_file
    directory = Path(directory)
    with folder_lock(directory, missing_ok=True):  # a save in progress commits before or after this read
        config = _read_config(directory)
        path = _verified_tensor_file(directory, config)
        layout = _file_layout(path)
        bases = _plan_load(model, config, layout)
        values = load_file(str(path))
    params = dict(model.named_parameters())
    swap = ModuleSwap(model)
    snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        built, partner = {}, tied_partners(model)
        for name, record in config["layers"].items():
            base, source = bases[name], record.get("weight_source") if isinstance(record, Mapping) else None
            if source is not None and partner(name) is not None:  # a tied head: its own copy again
                base = with_own_weight(base)
                swap.on_undo(untie_config(model))
            module = _build_layer(name, base, record)
            module.weight_source = source
            swap.put(name, module, follow_training=True)
            built[name] = module
        params.update(dict(model.named_parameters()))
        with torch.no_grad():
            for key in layout:
                target = params[key]
                snapshots.append((target, target.detach().clone()))
                target.copy_(values[key].to(target.device))
        mark_changed(*(params[key] for key in layout))  # they differ from the base: a later save keeps them
        for name, record in config["layers"].items():
            if record["merged"]:
                built[name].mark_merged_from_load()
    except BaseException:
        with torch.no_grad():
            for target, saved in reversed(snapshots):
                target.copy_(saved)
        swap.undo()
        raise
    return built


