"""``QuantLoRALinear``: the :class:`LoRALinear` interface over a frozen bitsandbytes 4-bit base.

.. math::  y = \\mathrm{deq}(Q)\\,x + b + \\underbrace{s \\cdot B A\\,x}_{\\text{LORA}}
           \\;\\text{or}\\; \\underbrace{D\\,x}_{\\text{FULL}}

The quantized original ``Q`` is **never re-quantized**. Measured (DESIGN 3.1): merging a
rank-16 update of relative size 1% into NF4 and re-quantizing keeps ~2% of it. So the
learned update lives beside ``Q``, in exactly one of two forms:

- factors ``A, B`` (``Mode.LORA``, trainable; or ``Mode.FROZEN``, kept frozen), or
- a dense ``D`` (``Mode.FULL``, trainable: full fine-tuning of ``W = deq(Q) + D``).

Promotion sets ``D = s·BA`` exactly. Demotion sets the adapter to the best rank-``r``
approximation of ``D`` (truncated SVD): exact when ``rank(D) ≤ r``, otherwise the
Frobenius error is the norm of the discarded singular values (Eckart–Young).
bitsandbytes is imported lazily; ``pip install 'adaptopt[quant]'`` provides it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ._imports import require
from .factors import factors_from_svd, fresh_factors, grow_factors, lora_scaling, svd_dense, svd_of_product
from .changes import mark_changed
from .lora import LoRALinear, is_quantized_linear, linear_geometry
from .modes import Mode

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


def quantize_linear(base: nn.Module, config: QuantConfig) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``base``'s weight (``Conv1D`` weights are transposed)."""
    bnb = require("bitsandbytes", extra="quant")
    in_features, out_features, fan_in_fan_out = linear_geometry(base)
    weight = base.weight.detach()
    if fan_in_fan_out:
        weight = weight.T
    compute_dtype = config.compute_dtype or weight.dtype
    quantized = bnb.nn.Linear4bit(in_features, out_features, bias=base.bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=config.double_quant, quant_type=config.quant_type,
                                  device="meta")
    quantized.weight = bnb.nn.Params4bit(weight.to(compute_dtype).contiguous(), requires_grad=False,
                                         quant_type=config.quant_type, compress_statistics=config.double_quant,
                                         blocksize=config.blocksize)
    if base.bias is not None:
        quantized.bias = nn.Parameter(base.bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return quantized.to(weight.device)  # bitsandbytes packs the weight on .to(device)


def keep_standard_layout(quantized: nn.Module) -> None:
    """Stop bitsandbytes from repacking the 4-bit weight for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes ≥ 0.49 repacks a ``Linear4bit`` weight *in place*
    the first time it runs in eval mode without grad, and from then on computes every
    forward (training too) through a bf16 kernel. Measured here on a 64×64 NF4 layer: outputs
    move by 5e-3, and ``dequantize_4bit`` of the repacked data is garbage. adaptopt needs one
    exact, stable ``deq(Q)`` (function-preserving transitions, scores, merged export), so
    adapted layers keep the standard layout. A weight already repacked is converted back; its
    block scales stay rounded to bf16 as the packing left them (that is what it computes with).
    """
    quantized.support_avx512bf16_for_cpu = False
    weight = quantized.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        bnb = require("bitsandbytes", extra="quant")
        weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state)
        state = weight.quant_state
        if state.absmax.dim() == 2:  # left transposed (in/blocksize, out) and bf16 by the packing
            state.absmax = state.absmax.T.reshape(-1).float().contiguous()
        quantized.quant_state = state


def dequantize(quantized: nn.Module) -> torch.Tensor:
    """``deq(Q)``: the dense ``(out, in)`` weight a bitsandbytes 4-bit layer computes with."""
    bnb = require("bitsandbytes", extra="quant")
    keep_standard_layout(quantized)
    state = quantized.weight.quant_state
    # bitsandbytes returns a transposed view when the packed data has one row (tiny layers);
    # both are the same row-major values, so reshaping restores (out, in).
    return bnb.functional.dequantize_4bit(quantized.weight.data, state).reshape(state.shape)


class QuantLoRALinear(LoRALinear):
    r""":class:`LoRALinear` over a frozen 4-bit (NF4 / FP4) base.

    .. math::  y = \mathrm{deq}(Q)x + b + s\cdot BAx \;(\text{LORA}) \quad\text{or}\quad + Dx \;(\text{FULL})

    Args:
        base: an ``nn.Linear`` / ``Conv1D`` (quantized here with ``quantize``) or an already
            quantized bitsandbytes ``Linear4bit`` (used as is).
        rank, alpha, dropout, rslora, mode: as for :class:`LoRALinear`.
        quantize: a :class:`QuantConfig`, ``"nf4"``/``"fp4"``, or a mapping of its fields.

    ``merge()`` builds a dense inference weight ``deq(Q) + ΔW`` beside ``Q`` (``Q`` itself is
    never re-quantized); ``unmerge()`` drops it.
    """

    delta: nn.Parameter | None

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, *, mode: Mode | str = Mode.LORA,
                 quantize: QuantConfig | str | Mapping[str, Any] = "nf4") -> None:
        config = QuantConfig.coerce(quantize)
        fan_in_fan_out = False
        if not is_quantized_linear(base):
            fan_in_fan_out = linear_geometry(base)[2]
            base = quantize_linear(base, config)
        else:
            config = QuantConfig(base.weight.quant_type, base.compute_dtype, bool(base.weight.compress_statistics),
                                 int(base.weight.blocksize))
        keep_standard_layout(base)
        super().__init__(base, rank, alpha, dropout, rslora, mode=Mode.FROZEN)
        self.register_parameter("delta", None)
        self.register_buffer("_merged_weight", None, persistent=False)
        self.fan_in_fan_out = fan_in_fan_out  # layout of the original (pre-quantization) weight
        self.quant_type: str = base.weight.quant_type
        self.quant_config = config  # how the base was quantized (saved with the adapters)
        self.set_mode(mode)

    def _weight_dtype(self) -> torch.dtype:
        return self.base.compute_dtype or self.base.weight.quant_state.dtype

    def _weight_device(self) -> torch.device:
        return self.base.weight.device

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged_weight is not None:
            w = self._merged_weight
            bias = None if self.base.bias is None else self.base.bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
        out = self._add_adapter(x, self.base(x))
        if self.delta is not None:
            out = out + F.linear(x.to(self.delta.dtype), self.delta).to(out.dtype)
        return out

    # ---------------------------------------------------------------- deltas
    def _learned_delta(self) -> torch.Tensor | None:
        if self.delta is not None:
            return self.delta.detach().float()
        return self._adapter_delta()

    def dequantized_weight(self) -> torch.Tensor:
        """``deq(Q)`` in the original layer's layout (``Conv1D``: ``(in, out)``)."""
        return self._to_base_layout(dequantize(self.base))

    def dense_weight(self) -> torch.Tensor:
        """``deq(Q) + ΔW``: the dense weight this layer computes with, original layout, fp32."""
        weight = dequantize(self.base).float()
        delta = self._learned_delta()
        return self._to_base_layout(weight if delta is None else weight + delta)

    def effective_weight(self) -> torch.Tensor:
        """``deq(Q) + ΔW``, fp32 ``(out, in)`` (the merged inference copy is never read)."""
        with torch.no_grad():
            weight = dequantize(self.base).float()
            delta = self._learned_delta()
            return weight if delta is None else weight + delta

    # ---------------------------------------------------------------- merge for inference
    def merge(self) -> None:
        """Build a dense inference weight ``deq(Q) + ΔW`` (``Q`` untouched). Idempotent."""
        if self.merged:
            return
        delta = self._learned_delta()
        self._check_finite(delta, "merge")
        weight = dequantize(self.base)
        if delta is not None:
            weight = (weight.float() + delta).to(weight.dtype)
        self._merged_weight = weight
        self.merged = True

    def unmerge(self) -> None:
        """Drop the dense inference weight. Idempotent."""
        self._merged_weight = None
        self.merged = False

    # ---------------------------------------------------------------- transitions
    def _transition(self, mode: Mode, rank: int) -> None:
        delta = self._learned_delta()
        dtype, device = self._weight_dtype(), self._weight_device()
        new_scaling = lora_scaling(self.alpha, rank, self.rslora)
        if mode is Mode.FULL:
            if self.delta is None:
                dense = delta if delta is not None else torch.zeros(self.out_features, self.in_features,
                                                                     device=device)
                self._set_factors(None, None)
                self.delta = nn.Parameter(dense.to(dtype=dtype, device=device))
        elif self.delta is not None:  # demotion: best rank-r approximation of D
            a, b, _ = factors_from_svd(svd_dense(self.delta.detach()), rank, new_scaling, dtype=dtype, device=device)
            self.delta = None
            self._set_factors(a, b)
        elif self.lora_A is not None and rank > self.rank:
            self._set_factors(*grow_factors(self.lora_A, self.lora_B, self.scaling, rank, new_scaling))
        elif self.lora_A is not None and rank < self.rank:
            svd = svd_of_product(self.lora_B.detach(), self.lora_A.detach(), self.scaling)
            self._set_factors(*factors_from_svd(svd, rank, new_scaling, dtype=dtype, device=device)[:2])
        elif self.lora_A is None and mode is Mode.LORA:
            self._set_factors(*fresh_factors(self.in_features, self.out_features, rank, dtype=dtype, device=device))
        self.rank = rank
        for p in (self.lora_A, self.lora_B):
            if p is not None:
                p.requires_grad_(mode is Mode.LORA)
        if self.delta is not None:
            self.delta.requires_grad_(True)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(mode is Mode.FULL)
            if mode is Mode.FULL:
                mark_changed(self.base.bias)
        self._mode = mode

    def _adopt_structure(self, factor_rank: int | None, has_delta: bool) -> None:
        """Factors and/or dense delta as a saved state describes; delta → FULL, factors alone →
        LORA (FROZEN stays FROZEN), neither → FROZEN."""
        was = self._mode
        self._adopt_factors(factor_rank)
        if has_delta and self.delta is None:
            self.delta = nn.Parameter(torch.zeros(self.out_features, self.in_features, dtype=self._weight_dtype(),
                                                  device=self._weight_device()))
        elif not has_delta:
            self.delta = None
        if has_delta:
            mode = Mode.FULL
        elif factor_rank is not None:
            mode = Mode.FROZEN if was is Mode.FROZEN else Mode.LORA
        else:
            mode = Mode.FROZEN
        for p in (self.lora_A, self.lora_B):
            if p is not None:
                p.requires_grad_(mode is Mode.LORA)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(mode is Mode.FULL)
        self._mode = mode

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_type}"
