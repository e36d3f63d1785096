"""``QuantConfig``: how a 4-bit base weight is quantized (torch only; bitsandbytes is not needed
to describe a quantization, only to perform it in :mod:`adaptopt.layers.quant`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a base weight to 4 bits.

    Attributes:
        quant_type: ``"nf4"`` (NormalFloat, QLoRA's default) or ``"fp4"``.
        compute_dtype: dtype of the dequantized matmul and of the adapters; ``None`` keeps
            the original weight's dtype.
        double_quant: also quantize the per-block absmax constants (QLoRA's "double quant").
        blocksize: elements per quantization block (64 is bitsandbytes' default).
    """

    quant_type: str = "nf4"
    compute_dtype: torch.dtype | None = None
    double_quant: bool = False
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"unknown quant type {self.quant_type!r}: use one of {QUANT_TYPES}")
        if self.compute_dtype is not None and not (isinstance(self.compute_dtype, torch.dtype)
                                                   and self.compute_dtype.is_floating_point):
            raise ValueError(f"compute_dtype must be a floating torch.dtype, got {self.compute_dtype!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {self.blocksize!r}")

    @classmethod
    def coerce(cls, value: "QuantConfig | str | Mapping[str, Any]") -> "QuantConfig":
        """Accept ``"nf4"``, ``"fp4"``, a mapping of this class's fields, or a ``QuantConfig``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(quant_type=value.lower())
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown quantize keys {sorted(unknown)}: allowed are "
                                 f"{sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise ValueError(f"quantize must be None, 'nf4', 'fp4' or a mapping, got {value!r}")
