"""Hugging Face folders that load silently with ``from_pretrained`` and stay exact for resume.

A model with adapters computes ``W + s·BA``; plain loaders know nothing of ``A`` and ``B``. So a
folder written by ``save_pretrained`` (``trainer.save_model``, every Trainer checkpoint) holds
the *plain* state dict — each layer's trained function under the original layer names, nothing
else, so ``AutoModel*.from_pretrained(folder)`` loads it without an "unexpected keys" table — and
is no bigger than the base model plus the factors (docs/formats.md).

What exact resume needs beyond that lives in a sidecar file beside it, ``adaptopt_layers.safetensors``
(as PEFT keeps ``adapter_model.safetensors``): the LoRA factors, 4-bit layers' dense deltas, and a
layer's base weight ``W`` only where it differs from the base model's (a fold changed it). An
unchanged ``W`` is not copied: it is read back from the base model the run started from (its
``name_or_path``), and checked against a fingerprint taken at save time. The HF callback installs
the plain ``save_pretrained`` and reads the sidecar when a run resumes. (A layer saved merged keeps
its merged weight under the plain name and its factors in the sidecar; loading both tells it
was merged, as for any state dict: ``layers/state_dict_keys.py``.)

Format ``adaptopt.layers/1``: the tensors under the layers' own parameter names
(``...q_proj.lora_A``, ``...q_proj.base.weight``), and in the safetensors metadata ``adaptopt`` a
JSON object: ``format``, ``base_model``, ``base_fingerprints`` (``{key: [Σw, Σw²]}`` in float64) and
``base_sources`` (``{key: the base model's key}`` where they differ: a tied output layer's own copy of
the input embeddings, ``adaptopt/surgery/output_adapter.py``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..layers.changed_marks import is_changed
from ..surgery.inject import find_adapters
from .atomic_files import save_tensors

SIDECAR = "adaptopt_layers.safetensors"
FORMAT = "adaptopt.layers/1"
EXACT_ONLY = ("lora_A", "lora_B", "delta")


def fingerprint(tensor: torch.Tensor) -> list[float]:
    """``[Σw, Σw²]`` in float64: cheap, and enough to tell another base model's weight apart."""
    t = tensor.detach().double()
    return [float(t.sum()), float(t.square().sum())]


def split_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(plain, exact, metadata)``: ``state`` (default ``model.state_dict()``) without what a plain
    loader does not know, which goes to ``exact`` — factors, deltas, and a layer's separate base
    weight when it changed, or when the model was not loaded from a local folder it could be read
back from (``name_or_path``); an unchanged, re-readable one is only fingerprinted (``metadata``)."""
    plain = dict(model.state_dict() if state is None else state)
    exact: dict[str, torch.Tensor] = {}
    fingerprints: dict[str, list[float]] = {}
    sources: dict[str, str] = {}
    base_model = str(getattr(model, "name_or_path", "") or "")
    rereadable = bool(base_model) and os.path.isdir(base_model)  # else W must travel in the sidecar
    for name, layer in find_adapters(model).items():
        prefix = f"{name}."
        for key in EXACT_ONLY:
            if prefix + key in plain:
                exact[prefix + key] = plain.pop(prefix + key)
        base_key = prefix + "base.weight"
        if base_key in plain:  # unmerged factors: W apart from s·BA (the plain weight holds W + s·BA)
            weight = plain.pop(base_key)
            if is_changed(layer.base.weight) or not rereadable:
                exact[base_key] = weight
            else:
                fingerprints[base_key] = fingerprint(weight)
                if layer.weight_source is not None:  # a tied output layer's copy: read from the embeddings
                    sources[base_key] = layer.weight_source
    metadata = {"format": FORMAT, "base_model": base_model, "base_fingerprints": fingerprints,
                "base_sources": sources}
    return plain, exact, metadata


def save_plainly(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` write the plain folder and the sidecar beside it, and
    ``model.load_state_dict`` of such a folder's weights keep every layer's structure (its factors,
    their update zeroed: the loaded weight exactly), so a resume reaches the sidecar with the layers
    it was saved from (idempotent; the HF callback calls it). Returns ``model``."""
    original = model.save_pretrained
    if getattr(original, "adaptopt_plain", False):
        return model

    def save_pretrained(directory: str | os.PathLike, *args: Any, state_dict: Any = None, **kwargs: Any) -> Any:
        plain, exact, metadata = split_state_dict(model, state_dict)
        result = original(directory, *args, state_dict=plain, **kwargs)
        if kwargs.get("is_main_process", True) and (exact or metadata["base_fingerprints"]):
            Path(directory).mkdir(parents=True, exist_ok=True)
            save_tensors(Path(directory) / SIDECAR, {k: v.detach().contiguous() for k, v in exact.items()},
                         metadata={"format": "pt", "adaptopt": json.dumps(metadata)})
        return result

    save_pretrained.adaptopt_plain = True  # type: ignore[attr-defined]
    save_pretrained.__doc__ = original.__doc__
    model.save_pretrained = save_pretrained  # type: ignore[method-assign]
    original_load = model.load_state_dict

    def load_state_dict(state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """A plain folder's weights (no adapter key at all) keep every layer's structure; see
        ``adaptopt.layers.state_dict_keys.take_saved_structure``. Anything else loads as any state dict does."""
        plain = not any(k.endswith(EXACT_ONLY) or ".base." in k for k in state_dict)
        layers = find_adapters(model).values() if plain else ()
        for layer in layers:
            layer.keep_structure_on_plain_load = True
        try:
            return original_load(state_dict, *args, **kwargs)
        finally:
            for layer in layers:
                layer.keep_structure_on_plain_load = False

    model.load_state_dict = load_state_dict  # type: ignore[method-assign]
    return model


def read_sidecar(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The sidecar's tensors and metadata, or ``None`` when the folder has none."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("adaptopt", "{}"))
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adaptopt layer sidecar (format {metadata.get('format')!r}, expected "
                         f"{FORMAT!r}); it is damaged: resume from another checkpoint")
    return load_file(str(path)), metadata


def exact_state_dict(plain: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, Any], original_weight: Callable[[str], torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """The model's exact state dict from a plain folder's tensors and its sidecar: the factors,
    deltas and changed base weights from the sidecar, each unchanged base weight from
    ``original_weight(plain key)`` (the base model's tensor), checked against its fingerprint.
    Loading it with ``model.load_state_dict`` restores every layer bit for bit. Raises one
    ``ValueError`` listing every problem."""
    problems = []
    full = {**plain, **tensors}
    for key, expected in metadata.get("base_fingerprints", {}).items():
        plain_key = metadata.get("base_sources", {}).get(key) or key.replace(".base.weight", ".weight")
        try:
            value = original_weight(plain_key)
        except (OSError, KeyError, ValueError) as err:
            problems.append(f"{plain_key}: cannot read it from the base model {metadata.get('base_model')!r} ({err})")
            continue
        if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(fingerprint(value), expected)):
            problems.append(f"{plain_key}: the base model's weight is not the one the run started from")
        full[key] = value
    if problems:
        raise ValueError("cannot restore the adapter layers exactly; nothing was changed:\n  - "
                         + "\n  - ".join(problems[:20]))
    return full
