"""``QuantLoRALinear``: the :class:`LoRALinear` interface over a frozen bitsandbytes 4-bit base.

.. math::  y = \\mathrm{deq}(Q)\\,x + b + \\underbrace{s \\cdot B A\\,x}_{\\text{LORA}}
           \\;\\text{or}\\; \\underbrace{D\\,x}_{\\text{FULL}}

The quantized original ``Q`` is **never re-quantized**. Measured (docs/design.md §3): merging a
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

from dataclasses import replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._imports import require
from ..modes import Mode
from .base_kinds import is_quantized_linear, linear_geometry
from .factors import check_init, factors_from_svd, lora_scaling, svd_dense
from .fused_quant_lora import FusedQuantLoRALinear, can_fuse_quant
from .lora import LoRALinear
from .mapped_pages import release_file_pages
from .quant_config import QUANT_TYPES, QuantConfig

__all__ = ["QUANT_TYPES", "QuantConfig", "QuantLoRALinear", "dequantize", "keep_standard_layout", "quantize_linear"]

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

    Guarantee (docs/design.md §3): ``Q`` is never written, so an update is kept as factors or
    as ``D``. Exact: LORA → FULL (``D = s·BA``), LORA → FROZEN (factors kept, frozen), FROZEN →
    LORA / FULL, rank growth. **Lossy** — the new update ``U'`` is the best rank-``r``
    approximation of the old one ``U`` (``D`` or ``s·BA``), with the weight error exactly

    .. math::  \lVert U - U' \rVert_F = \sqrt{\textstyle\sum_{i>r} \sigma_i(U)^2}

    (Eckart–Young; zero when ``rank(U) ≤ r``): FULL → LORA and FULL → FROZEN at rank ``r``,
    and a rank cut ``r → r' < r``. The output then moves by at most ``‖U − U'‖₂ · ‖x‖`` per row.
    """

    delta: nn.Parameter | None

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, *, mode: Mode | str = Mode.LORA,
                 quantize: QuantConfig | str | Mapping[str, Any] = "nf4", init: str = "default") -> None:
        if check_init(init) != "default":
            raise ValueError("init='pissa' moves the weight's principal part out of the base weight, but a 4-bit "
                             "base is never rewritten (that would re-quantize it); use init='default' with quantize, "
                             "or PiSSA on a plain base")
        config = QuantConfig.coerce(quantize)
        fan_in_fan_out = False
        if not is_quantized_linear(base):
            fan_in_fan_out = linear_geometry(base)[2]
            original = base.weight
            base = quantize_linear(base, config)
            release_file_pages(original)  # its fp32 pages of a mapped checkpoint file (adaptopt/layers/mapped_pages.py)
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
    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged_weight is not None:
            w = self._merged_weight
            bias = None if self.base.bias is None else self.base.bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
        if self._fusable_quant(x):
            return FusedQuantLoRALinear.apply(x, self._dequantize_base, self.base.bias, self.lora_A, self.lora_B,
                                              self.scaling)
        out = self._add_adapter(x, self.base(x))
        if self.delta is not None:
            out = out + F.linear(x.to(self.delta.dtype), self.delta).to(out.dtype)
        return out

    def _fusable_quant(self, x: torch.Tensor) -> bool:
        """Factors over the 4-bit base without a dense delta, adapter dropout or hooks on the base:
        one autograd node that never keeps ``deq(Q)`` alive (:mod:`adaptopt.layers.fused_quant_lora`)."""
        base = self.base
        return (self.lora_A is not None and self.delta is None and isinstance(self.dropout, nn.Identity)
                and not (base._forward_hooks or base._forward_pre_hooks)
                and can_fuse_quant(x, self._weight_dtype(), base.bias, self.lora_A))

    def _dequantize_base(self) -> torch.Tensor:
        return dequantize(self.base)

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

    def merged_weight(self) -> torch.Tensor:
        """``deq(Q) + ΔW`` dequantized, in the original layout and the compute dtype (merged exports)."""
        return self.dense_weight().to(self._weight_dtype())

    def effective_weight(self) -> torch.Tensor:
        """``deq(Q) + ΔW``, fp32 ``(out, in)`` (the merged inference copy is never read)."""
        with torch.no_grad():
            weight = dequantize(self.base).float()
            delta = self._learned_delta()
            return weight if delta is None else weight + delta

    # ---------------------------------------------------------------- state dicts
    _merge_lives_in_weight = False  # merge() builds a dense copy beside Q; Q never holds an update

    def _state_dict_effective_weight(self) -> None:
        """The packed weight keeps the plain name: a dense loader stops on its shape instead of
        loading a wrong function (:mod:`adaptopt.layers.state_dict_keys`)."""
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[no-untyped-def]
        """As for plain layers; then the saved quantization state (absmax, quant map, ...) is checked
        against this layer's: ``Q`` never changes in training, so a difference means another base."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        stem = prefix + "base.weight."
        saved = {k[len(stem):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(stem)]}
        if not saved:
            return
        current = self.base.weight.quant_state.as_dict(packed=True)
        differs = sorted(n for n, v in saved.items()
                         if n not in current or not torch.equal(v.cpu(), current[n].cpu()))
        if differs:
            error_msgs.append(f"{prefix[:-1] or 'layer'}: the checkpoint's 4-bit base was quantized from other weights "
                              f"or settings ({', '.join(differs)} differ); build the model from the same base model "
                              "and 4-bit settings as the run that saved it")

    # ---------------------------------------------------------------- merge for inference
    def mark_merged_from_load(self) -> None:
        """The 4-bit base cannot hold a merged update: rebuild the dense inference copy."""
        self.merge()

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
    # Only three steps differ from LoRALinear: Q is never written, so an update lives in
    # factors (LORA, or FROZEN keeping them) or in the dense delta D (FULL).
    def _keeps_factors(self, mode: Mode) -> bool:
        """LORA holds factors; FROZEN keeps whatever update the layer has as frozen factors."""
        return mode is Mode.LORA or (mode is Mode.FROZEN and (self.lora_A is not None or self.delta is not None))

    def _start_factors(self, rank: int) -> None:
        """From FULL: the best rank-``rank`` approximation of ``D`` (lossy unless rank(D) ≤ r:
        the Frobenius error is the norm of the discarded singular values). Otherwise fresh."""
        if self.delta is None:
            super()._start_factors(rank)
            return
        a, b, _ = factors_from_svd(svd_dense(self.delta.detach()), rank, lora_scaling(self.alpha, rank, self.rslora),
                                   dtype=self._weight_dtype(), device=self._weight_device())
        self.delta = None
        self._set_factors(a, b)

    def _release_factors(self, mode: Mode) -> None:
        """To FULL: ``D = s·BA`` exactly (zeros without factors); the factors are dropped."""
        if mode is not Mode.FULL or self.delta is not None:
            return
        delta = self._learned_delta()
        dense = delta if delta is not None else torch.zeros(self.out_features, self.in_features,
                                                            device=self._weight_device())
        self._set_factors(None, None)
        self.delta = nn.Parameter(dense.to(dtype=self._weight_dtype(), device=self._weight_device()))

    _cut_dtype = torch.float64  # the remainder is discarded: the kept part must be as exact as it can be

    def _absorb_remainder(self, remainder: torch.Tensor) -> None:
        """A rank cut's remainder is discarded (Q is never re-quantized): the error is the norm
        of the discarded singular values."""

    # ---------------------------------------------------------------- structure
    def _quant_layout(self) -> QuantConfig | None:
        config = getattr(self, "quant_config", None)
        return None if config is None else replace(config, compute_dtype=self._weight_dtype())

    def _adopt_delta(self, has_delta: bool) -> None:
        if has_delta and self.delta is None:
            self.delta = nn.Parameter(torch.zeros(self.out_features, self.in_features, dtype=self._weight_dtype(),
                                                  device=self._weight_device()))
        elif not has_delta:
            self.delta = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_type}"
