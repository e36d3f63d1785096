"""``LoRALinear``: one linear layer that can be frozen, LoRA-adapted or fully trained.

.. math::  y = \\mathrm{base}(x) + s \\cdot B A\\, \\mathrm{dropout}(x), \\qquad s = \\alpha / r
           \\;(\\text{or } \\alpha/\\sqrt{r} \\text{ with rsLoRA})

The wrapped ``base`` is an ``nn.Linear`` or a GPT-2-style ``Conv1D`` (weight stored
``(in, out)``, detected by duck typing so transformers is never imported). The base
weight keeps its ``Parameter`` identity through every transition, so optimizer state
keyed on it stays valid.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..modes import Mode
from .base_kinds import is_conv1d, is_quantized_linear, linear_geometry
from .changed_marks import mark_changed
from .factors import (
    check_init,
    check_rank_alpha,
    compute_dtype,
    factors_from_svd,
    fresh_factors,
    grow_factors,
    lora_scaling,
    pissa_factors,
    svd_of_product,
)
from .fused_lora import FusedLoRALinear, can_fuse
from .layout import Layout, TensorSpec
from .quant_config import QuantConfig
from .sharded import gathered, is_sharded, local_part, local_tensor, with_sharding_of
from .state_dict_keys import take_saved_structure, write_plain_names
from .trainable_flags import sync_layer_requires_grad


def _rounded_sum(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` summed in :func:`compute_dtype` and rounded once to ``W``'s dtype."""
    return (weight.to(compute_dtype(weight.dtype, delta.dtype)) + delta.to(weight.device)).to(weight.dtype)


class LoRALinear(nn.Module):
    r"""A linear layer with a per-layer trainable state (:class:`~adaptopt.Mode`).

    .. math::  y = \mathrm{base}(x) + s \cdot B A\,\mathrm{dropout}(x), \quad s = \alpha / r

    Args:
        base: the ``nn.Linear`` or ``Conv1D`` to wrap; it is kept, not copied.
        rank: adapter rank ``r`` (> 0), used whenever the layer is in ``Mode.LORA``.
        alpha: LoRA ``alpha`` (> 0).
        dropout: dropout on the adapter input (0 means no dropout module at all).
        rslora: use ``s = alpha / √r`` (rank-stabilised LoRA).
        init: how an adapter starts whenever the layer enters ``Mode.LORA``: ``"default"``
            (A Kaiming-uniform, B = 0) or ``"pissa"`` (the weight's principal rank-r part moves
            into A and B, the residual stays in W: the function is unchanged; docs/design.md §3).
        mode: the initial mode; ``Mode.LORA`` starts a fresh adapter with ``B = 0``, so the
            wrapped layer computes exactly what ``base`` did.

    Modes: ``FROZEN`` trains nothing, ``LORA`` trains ``A`` and ``B`` only, ``FULL`` trains the
    base weight and bias. :meth:`set_mode` moves between them without changing the function.

    Guarantee: **every** transition is exact — the output for any input is unchanged up to one
    rounding of the weight (≤ 1e-6 of the output scale in float32; docs/design.md §3). Whatever
    an adapter gives up (on leaving LORA, or the remainder of a rank cut) is folded into ``W``.

    Raises:
        ValueError: rank ≤ 0, alpha ≤ 0, dropout outside [0, 1).
        TypeError: ``base`` is not linear-like (or is 4-bit: use :class:`QuantLoRALinear`).
    """

    lora_A: nn.Parameter | None
    lora_B: nn.Parameter | None

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, *, mode: Mode | str = Mode.LORA, init: str = "default") -> None:
        super().__init__()
        check_rank_alpha(rank, alpha)
        self.init = check_init(init)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (a number, not a string), got {dropout!r}")
        mode = Mode.coerce(mode)
        if is_quantized_linear(base) and type(self) is LoRALinear:
            raise TypeError("base is a bitsandbytes 4-bit layer: wrap it with adaptopt.QuantLoRALinear")
        self.in_features, self.out_features, self.fan_in_fan_out = linear_geometry(base)
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = bool(rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.merged = False
        self.adapters_disabled = False
        self.target = None  # TargetInfo, filled in by inject_adapters
        # a tied output layer's own copy: the parameter the weight was copied from (surgery/output_adapter.py)
        self.weight_source: str | None = None
        self._mode = Mode.FROZEN
        sync_layer_requires_grad(self)
        self.set_mode(mode)
        self.register_state_dict_post_hook(write_plain_names)

    # ---------------------------------------------------------------- properties
    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` (``alpha / √r`` with rsLoRA) for the current rank."""
        return lora_scaling(self.alpha, self.rank, self.rslora)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (in the base module's own layout)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def block_index(self) -> int | None:
        return None if self.target is None else self.target.block_index

    @property
    def layer_type(self) -> str | None:
        return None if self.target is None else self.target.layer_type

    def _weight_dtype(self) -> torch.dtype:
        return self.base.weight.dtype

    def _weight_device(self) -> torch.device:
        return self.base.weight.device

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapters_disabled:
            return self.base(x)  # adaptopt.surgery.unload.disable_adapters: the base function only
        return self._adapted_forward(x)

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):
            base = self.base
            return FusedLoRALinear.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling,
                                         self.fan_in_fan_out)
        out = self.base(x)
        return self._add_adapter(x, out)

    def _fusable(self, x: torch.Tensor) -> bool:
        """LORA mode over a plain ``nn.Linear`` / ``Conv1D`` base without hooks of its own and
        no adapter dropout: one autograd node does it all (:mod:`adaptopt.layers.fused_lora`)."""
        base = self.base
        return (self.lora_A is not None and not self.merged and isinstance(self.dropout, nn.Identity)
                and (type(base) is nn.Linear or is_conv1d(base))
                and not (base._forward_hooks or base._forward_pre_hooks)
                and can_fuse(x, base.weight, base.bias, self.lora_A))

    def _add_adapter(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = self.lora_A
        if a is None or self.merged:
            return out
        update = F.linear(F.linear(self.dropout(x.to(a.dtype)), a), self.lora_B)
        return out + (update * self.scaling).to(out.dtype)

    # ---------------------------------------------------------------- deltas
    def _adapter_delta(self) -> torch.Tensor | None:
        """``s · B @ A`` in :func:`compute_dtype`, ``(out, in)`` layout, or ``None`` without an adapter."""
        if self.lora_A is None:
            return None
        dtype = compute_dtype(self.lora_A.dtype, self._weight_dtype())
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    def _learned_delta(self) -> torch.Tensor | None:
        """Everything the layer adds on top of its base weight, ``(out, in)``, in :func:`compute_dtype`."""
        return self._adapter_delta()

    def _to_base_layout(self, linear_layout: torch.Tensor) -> torch.Tensor:
        return linear_layout.T if self.fan_in_fan_out else linear_layout

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s·BA`` in the base weight's layout and dtype (zeros without an adapter)."""
        delta = self._learned_delta()
        if delta is None:
            delta = torch.zeros(self.out_features, self.in_features, device=self._weight_device())
        return self._to_base_layout(delta).to(self._weight_dtype())

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with, ``W + s·BA`` (or ``W + D``), fp32 ``(out, in)``.

        Used by the weight-only scores (SNR, SVD / CE / CS, norms) whatever the mode.
        """
        with torch.no_grad():
            weight = gathered(self.base.weight.detach()).float()  # FSDP2: every rank gathers the whole weight
            weight = weight.T if self.fan_in_fan_out else weight
            delta = None if self.merged else self._learned_delta()
            return weight if delta is None else weight + delta.float()

    def check_transition(self, mode: Mode | str, rank: int | None = None) -> None:
        """Raise ``ValueError`` if :meth:`set_mode` could not make this move (a non-finite
        update); changes nothing."""
        mode = Mode.coerce(mode)
        rank = self.rank if rank is None else rank
        if (mode, rank) == (self._mode, self.rank):
            return
        self._check_finite(self._learned_delta(), f"move to {mode.value} (rank {rank})")

    def _name(self) -> str:
        return self.target.name if self.target is not None else type(self).__name__

    def _check_finite(self, delta: torch.Tensor | None, action: str) -> None:
        if delta is not None and not bool(torch.isfinite(delta).all()):
            raise ValueError(
                f"cannot {action} layer {self._name()!r}: its learned update contains NaN or inf, so the layer was "
                "left unchanged. Lower the learning rate or clip gradients, and restore finite factors "
                "(e.g. from a checkpoint) before retrying.")

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        """``W ← W + ΔW`` in place (fp32 or fp64 arithmetic, one rounding), keeping the Parameter's identity.
        An all-zero ``ΔW`` (a fresh adapter) leaves ``W`` untouched, and unmarked as changed. A
        weight sharded by FSDP2 takes its own rows of ``ΔW`` on each rank (:mod:`adaptopt.layers.sharded`)."""
        if not bool(delta.any()):
            return
        w = self.base.weight
        mark_changed(w)
        with torch.no_grad():
            stored = local_tensor(w)
            stored.copy_(_rounded_sum(stored, self._rows_held(self._to_base_layout(delta))))

    def merged_weight(self) -> torch.Tensor:
        """``W + ΔW`` in the base layer's own layout and dtype (what a merged export holds), summed
        in :func:`compute_dtype` and rounded once."""
        with torch.no_grad():
            weight = gathered(self.base.weight.detach())
            delta = None if self.merged else self._learned_delta()
            return weight if delta is None else _rounded_sum(weight, self._to_base_layout(delta))

    def _rows_held(self, full: torch.Tensor) -> torch.Tensor:
        """The part of ``full`` (base layout) matching what this rank stores of the base weight."""
        weight = self.base.weight
        return local_part(weight, full) if is_sharded(weight) else full

    # ---------------------------------------------------------------- merge for inference
    def mark_merged_from_load(self) -> None:
        """A checkpoint saved merged was loaded: its saved base weight already holds the update."""
        self.merged = True

    def merge(self) -> None:
        """Fold the adapter into the base weight for inference. Idempotent; undo with :meth:`unmerge`.

        Raises ``ValueError`` (and changes nothing) if the update is not finite.
        """
        if self.merged:
            return
        delta = self._adapter_delta()
        self._check_finite(delta, "merge")
        if delta is not None:
            self._add_to_base_weight(delta)
        self.merged = True

    def unmerge(self) -> None:
        """Take a merged adapter back out of the base weight. Idempotent."""
        if not self.merged:
            return
        delta = self._adapter_delta()
        if delta is not None:
            self._add_to_base_weight(-delta)
        self.merged = False

    # ---------------------------------------------------------------- transitions
    def set_mode(self, mode: Mode | str, rank: int | None = None) -> None:
        """Switch to ``mode`` (and/or ``rank``) without changing the layer's function.

        - LORA → FULL / FROZEN: ``s·BA`` is folded into the base weight, the adapter dropped.
        - FULL / FROZEN → LORA: a fresh adapter with ``B = 0`` starts on the current weight.
        - LORA rank ``r → r' > r``: ``A`` keeps its rows and gains fresh ones, ``B`` is rescaled
          by ``s/s'`` and padded with zeros (exact). ``r' < r``: the adapter becomes the best
          rank-``r'`` approximation of ``s·BA`` and the remainder is folded into the base weight.

        The output is unchanged up to one floating-point rounding of the weight
        (docs/design.md §3). A layer whose update is not finite raises ``ValueError`` and is
        left as it was. A merged layer is unmerged, transitioned and merged again.
        """
        mode = Mode.coerce(mode)
        rank = self.rank if rank is None else rank
        check_rank_alpha(rank, self.alpha)
        if mode is self._mode and rank == self.rank:
            return
        self.check_transition(mode, rank)
        self._move(mode, rank)

    def _move(self, mode: Mode, rank: int) -> None:
        """:meth:`set_mode` after :meth:`check_transition` passed (``adaptopt.training.transitions`` checks
        every layer of a decision first, then moves them)."""
        was_merged = self.merged
        self.unmerge()
        try:
            self._transition(mode, rank)
        finally:
            if was_merged:
                self.merge()

    def _transition(self, mode: Mode, rank: int) -> None:
        """The move itself, in three steps the 4-bit subclass overrides where it differs:
        where factors come from (:meth:`_start_factors`), where an update goes when the
        factors are given up (:meth:`_release_factors`) and where a rank cut's remainder goes
        (:meth:`_absorb_remainder`)."""
        if self._keeps_factors(mode):
            if self.lora_A is None:
                self._start_factors(rank)
            elif rank != self.rank:
                self._resize_factors(rank)
        else:
            self._release_factors(mode)
        self.rank = rank
        self._mode = mode
        sync_layer_requires_grad(self)
        if mode is Mode.FULL:
            mark_changed(*(p for _, p in self.mode_parameters()))

    def _keeps_factors(self, mode: Mode) -> bool:
        """Does the layer hold factors in ``mode``? Plain layers: only in LORA."""
        return mode is Mode.LORA

    def _start_factors(self, rank: int) -> None:
        """A fresh adapter (``B = 0``) on the current weight; with PiSSA, the weight's principal
        rank-``rank`` part moved into the factors (``W ← W − s·BA``, one rounding)."""
        if self.init != "pissa":
            self._set_factors(*fresh_factors(self.in_features, self.out_features, rank,
                                             dtype=self._weight_dtype(), device=self._weight_device()))
            return
        weight = gathered(self.base.weight.detach())
        weight = weight.T if self.fan_in_fan_out else weight
        scaling = lora_scaling(self.alpha, rank, self.rslora)
        a, b = pissa_factors(weight, rank, scaling, dtype=self._weight_dtype(), device=self._weight_device())
        dtype = compute_dtype(a.dtype, weight.dtype)
        self._add_to_base_weight(-(b.detach().to(dtype) @ a.detach().to(dtype)) * scaling)
        self._set_factors(a, b)

    def _release_factors(self, mode: Mode) -> None:
        """Leaving LORA: ``W ← W + s·BA``, then no factors."""
        delta = self._adapter_delta()
        if delta is not None:
            self._add_to_base_weight(delta)
        self._set_factors(None, None)

    def _resize_factors(self, rank: int) -> None:
        """Grow exactly, or cut to the best rank-``rank`` part and pass the remainder on."""
        new_scaling = lora_scaling(self.alpha, rank, self.rslora)
        if rank > self.rank:
            self._set_factors(*grow_factors(self.lora_A, self.lora_B, self.scaling, rank, new_scaling))
            return
        delta = self._adapter_delta()
        svd = svd_of_product(self.lora_B.detach(), self.lora_A.detach(), self.scaling, dtype=self._cut_dtype)
        a, b, _ = factors_from_svd(svd, rank, new_scaling, dtype=self.lora_A.dtype, device=self.lora_A.device)
        kept = (b.detach().to(delta.dtype) @ a.detach().to(delta.dtype)) * new_scaling
        self._absorb_remainder(delta - kept)
        self._set_factors(a, b)

    _cut_dtype: torch.dtype | None = None  # the remainder is folded into W: compute_dtype suffices

    def _absorb_remainder(self, remainder: torch.Tensor) -> None:
        """A rank cut's discarded part ``s·BA − s'·B'A'`` is folded into W (so the cut is exact)."""
        self._add_to_base_weight(remainder)

    def _set_factors(self, a: nn.Parameter | None, b: nn.Parameter | None) -> None:
        self.lora_A, self.lora_B = a, b

    # ---------------------------------------------------------------- structure
    def layout(self) -> Layout:
        """This layer's structure as a :class:`~adaptopt.layers.layout.Layout`."""
        return Layout(self._mode, self.rank, self.alpha, self.rslora, float(getattr(self.dropout, "p", 0.0)),
                      self._quant_layout(), self.lora_A is not None, self.merged)

    def _quant_layout(self) -> QuantConfig | None:
        return None

    def adopt_layout(self, layout: Layout) -> None:
        """Take ``layout``'s structure (mode, rank, factors, 4-bit delta) *without* preserving
        the function: new factors are fresh, to be overwritten by a load. A no-op when the
        structure already matches. Used to load checkpoints, never for training transitions."""
        if layout.structure() == self.layout().structure():
            return
        check_rank_alpha(layout.rank, self.alpha)
        if not layout.has_factors:
            self._set_factors(None, None)
        elif self.lora_A is None or self.rank != layout.rank:
            self._set_factors(*fresh_factors(self.in_features, self.out_features, layout.rank,
                                             dtype=self._weight_dtype(), device=self._weight_device()))
        self._adopt_delta(layout.has_delta)
        self.rank = layout.rank
        self._mode = layout.mode
        sync_layer_requires_grad(self)

    def _adopt_delta(self, has_delta: bool) -> None:
        """Plain layers have no dense delta."""

    # ---------------------------------------------------------------- state dicts
    _merge_lives_in_weight = True  # merge() adds s·BA to W itself (4-bit layers keep a dense copy instead)

    def _state_dict_effective_weight(self) -> torch.Tensor | None:
        """What ``state_dict()`` writes under the plain ``weight`` name when it is not the base
        weight itself: ``W + s·BA`` for unmerged factors (:mod:`adaptopt.layers.state_dict_keys`)."""
        if self.lora_A is None or self.merged:
            return None
        weight = self.base.weight.detach()
        with torch.no_grad():
            if not is_sharded(weight):
                return self.merged_weight().contiguous()
            # FSDP2: each rank writes its own rows, sharded as the weight is (no communication)
            local = _rounded_sum(local_tensor(weight), self._rows_held(self._to_base_layout(self._learned_delta())))
            return with_sharding_of(weight, local.contiguous())

    keep_structure_on_plain_load = False  # set while a plain folder loads (adaptopt.formats.hf_folders)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Take the structure the saved state describes
        (:func:`~adaptopt.layers.state_dict_keys.take_saved_structure`), then load the values as usual."""
        take_saved_structure(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- introspection
    def tensor_specs(self, layout: Layout | None = None) -> dict[str, TensorSpec]:
        """:meth:`Layout.tensors` for this layer, in its current layout unless one is given: the
        tensors (names relative to the layer) it holds in that state and which of them train."""
        layout = self.layout() if layout is None else layout
        shape = None if layout.quant is not None else tuple(self.base.weight.shape)
        return layout.tensors(self.in_features, self.out_features, shape, self.base.bias is not None)

    def mode_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs the current mode trains (:meth:`Layout.tensors`):
        ``lora_A, lora_B`` in LORA, the weight (or 4-bit layers' dense ``delta``) and bias in
        FULL, none when FROZEN."""
        return [(name, self.get_parameter(name)) for name, spec in self.tensor_specs().items() if spec.trains]

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs that train in the current mode (names relative to this module)."""
        for name, p in self.named_parameters():
            if p.requires_grad:
                yield name, p

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, mode={self._mode.value}, rank={self.rank}, "
                f"alpha={self.alpha:g}, rslora={self.rslora}, merged={self.merged}")
