"""What an adapter layer *is*, declared once: its :class:`Layout` and the tensors each state has.

A layer's structure is a small frozen record — mode, rank, alpha, rsLoRA, dropout, 4-bit
settings, whether it holds LoRA factors, whether an adapter is merged — and everything that
depends on structure reads it from here (docs/design.md §2):

- :meth:`Layout.tensors`: the tensors the layer holds in that state, their shapes and which
  of them train. The modules' ``mode_parameters``, the optimizer's trainable plan and its
  checkpoint validation, and ``load_adapters``' validation all use it.
- :meth:`Layout.to_record` / :meth:`Layout.from_record`: the JSON form in ``adapters.json``
  and in the optimizer's ``state_dict`` (older records lacking fields load with defaults).

Building a layer in a given layout lives with injection (:func:`adaptopt.surgery.inject.build_layer`);
putting layers into a model and taking them back out, in :mod:`adaptopt.surgery.swap`. This module
declares and imports nothing above it.

The declared states (docs/design.md §2):

============================  ==========  =========================  ==========================
state                         factors     dense delta (4-bit only)   what trains
============================  ==========  =========================  ==========================
FROZEN                        no          no                         nothing
FROZEN with factors (4-bit)   yes         no                         nothing (update kept)
LORA                          yes         no                         ``lora_A``, ``lora_B``
FULL                          no          4-bit: yes                 weight (4-bit: ``delta``), bias
============================  ==========  =========================  ==========================
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, NamedTuple

import torch

from ..modes import Mode
from .quant_config import QuantConfig


class TensorSpec(NamedTuple):
    """One tensor a layer holds in a layout: its shape, whether it trains, and its kind
    (``"factor"``, ``"delta"``, ``"weight"`` or ``"bias"``)."""

    shape: tuple[int, ...]
    trains: bool
    kind: str


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the adapter config")
    return dtype


@dataclass(frozen=True)
class Layout:
    """The structure of one adapter layer (see the module docstring for the states)."""

    mode: Mode
    rank: int
    alpha: float
    rslora: bool = False
    dropout: float = 0.0
    quant: QuantConfig | None = None
    has_factors: bool = False
    merged: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.coerce(self.mode))
        if self.mode is Mode.LORA and not self.has_factors:
            raise ValueError("a LORA layer holds factors: has_factors must be True")
        if self.has_factors and self.mode is Mode.FULL:
            raise ValueError("a FULL layer holds no factors (its update is in the weight, or the 4-bit delta)")
        if self.has_factors and self.mode is Mode.FROZEN and self.quant is None:
            raise ValueError("a plain FROZEN layer holds no factors (they are folded into its weight); only "
                             "4-bit layers keep frozen factors")

    @property
    def has_delta(self) -> bool:
        """4-bit layers train a dense delta beside the quantized weight in FULL."""
        return self.quant is not None and self.mode is Mode.FULL

    def structure(self) -> tuple[Mode, int, bool, bool]:
        """What decides which tensors exist and train: ``(mode, rank, has_factors, has_delta)``."""
        return self.mode, self.rank, self.has_factors, self.has_delta

    def tensors(self, in_features: int, out_features: int, weight_shape: tuple[int, ...] | None,
                has_bias: bool) -> dict[str, TensorSpec]:
        """The tensors (names relative to the layer) this layout implies, in parameter-group
        order. ``weight_shape`` is the plain base weight's shape (``None`` for a 4-bit base,
        whose packed weight never trains and is never saved)."""
        specs: dict[str, TensorSpec] = {}
        if self.has_factors:
            specs["lora_A"] = TensorSpec((self.rank, in_features), self.mode is Mode.LORA, "factor")
            specs["lora_B"] = TensorSpec((out_features, self.rank), self.mode is Mode.LORA, "factor")
        if self.has_delta:
            specs["delta"] = TensorSpec((out_features, in_features), True, "delta")
        if self.quant is None and weight_shape is not None:
            specs["base.weight"] = TensorSpec(tuple(weight_shape), self.mode is Mode.FULL, "weight")
        if has_bias:
            specs["base.bias"] = TensorSpec((out_features,), self.mode is Mode.FULL, "bias")
        return specs

    def with_structure(self, mode: Mode, rank: int, has_factors: bool) -> "Layout":
        return replace(self, mode=Mode.coerce(mode), rank=int(rank), has_factors=bool(has_factors))

    # ------------------------------------------------------------------ records
    def to_record(self) -> dict[str, Any]:
        """Plain JSON: the fields of ``adapters.json`` and of the optimizer's layer records."""
        quant = None
        if self.quant is not None:
            q = self.quant
            quant = {"quant_type": q.quant_type, "compute_dtype": dtype_name(q.compute_dtype),
                     "double_quant": q.double_quant, "blocksize": q.blocksize}
        return {"mode": self.mode.value, "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
                "dropout": self.dropout, "merged": self.merged, "has_factors": self.has_factors, "quantize": quant}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], fallback: "Layout | None" = None) -> "Layout":
        """The layout a record describes; fields it lacks (records written before they existed)
        come from ``fallback``. Raises ``ValueError``/``KeyError`` naming a malformed field."""
        def get(key: str, default: Any) -> Any:
            if key in record:
                return record[key]
            if fallback is None:
                raise KeyError(key)
            return default
        fb = fallback
        if "quantize" in record:
            q = record["quantize"]
            quant = None if q is None else QuantConfig(q["quant_type"], dtype_from_name(q.get("compute_dtype")),
                                                       bool(q.get("double_quant", False)), int(q.get("blocksize", 64)))
        elif fb is not None:
            quant = fb.quant
        else:
            raise KeyError("quantize")
        mode = Mode.coerce(record["mode"])
        return cls(mode=mode, rank=int(record["rank"]), alpha=float(get("alpha", fb and fb.alpha)),
                   rslora=bool(get("rslora", fb and fb.rslora)), dropout=float(get("dropout", fb and fb.dropout)),
                   quant=quant, has_factors=bool(get("has_factors", mode is Mode.LORA)),
                   merged=bool(get("merged", False)))


def implied_by_state_dict(current: Layout, factor_rank: int | None, has_delta: bool) -> Layout:
    """The structure a full state dict of a layer implies, given what it holds: factors of
    ``factor_rank`` → LORA (a 4-bit layer that is FROZEN stays FROZEN with factors), a dense
    delta → FULL, neither → FROZEN (FULL if the layer is FULL: the weight alone can't tell)."""
    if has_delta:
        return current.with_structure(Mode.FULL, current.rank, False)
    if factor_rank is not None:
        keep_frozen = current.quant is not None and current.mode is Mode.FROZEN
        return current.with_structure(Mode.FROZEN if keep_frozen else Mode.LORA, factor_rank, True)
    return current.with_structure(Mode.FULL if current.mode is Mode.FULL else Mode.FROZEN, current.rank, False)
