"""Policies from weight SNR: Spectrum and ALoRS (docs/design.md §7)."""
from __future__ import annotations

import math
from typing import Any, Mapping

from ..modes import Mode
from ..scores.spectrum import SNR_MODES
from .base import (
    LayerDecision,
    LayerView,
    Policy,
    Scores,
    check_percent,
    check_positive_int,
    percent_count,
    register_policy,
)


def snr_key(mode: str) -> str:
    if mode not in SNR_MODES:
        raise ValueError(f"SNR mode must be one of {SNR_MODES}, got {mode!r}")
    return "snr" if mode == "mp" else "snr_compat"


def rank_by_snr(layers: Mapping[str, LayerView], scores: Scores, key: str, per_type: bool) -> list[list[str]]:
    """Layer names grouped by type (or one group), each sorted by SNR descending; NaN last,
    ties in model order (Python's stable sort, as ``spectrum.py``)."""
    groups: dict[str, list[str]] = {}
    for name, view in layers.items():
        groups.setdefault(view.layer_type if per_type else "", []).append(name)

    def snr(name: str) -> float:
        value = scores.get(name, {}).get(key)
        if value is None:
            raise ValueError(f"no {key!r} score for layer {name!r}")
        return -math.inf if math.isnan(value) else value
    return [sorted(names, key=snr, reverse=True) for names in groups.values()]


@register_policy
class Spectrum(Policy):
    """Spectrum: per layer type, the top ``top_percent`` % of layers by SNR train fully, the
    rest stay frozen — ``int(n·p/100)`` of ``n`` per type, as ``spectrum.py`` counts.

    Args:
        top_percent: percent of each layer type to train (Spectrum's default: 50).
        mode: ``"mp"`` (default, Marchenko–Pastur noise edge) or ``"compat"`` (the numbers of
            ``spectrum.py``); see :mod:`adaptopt.scores.spectrum`.
        rescan_epochs: re-score and re-select every this many epochs (``None``: once, at the
            start, like the original tool).

    Unlike the original tool it does not also unfreeze ``lm_head`` / ``embed_tokens`` (pass
    ``trainable=`` to the optimizer for that); a block whose targets are all selected trains
    its norms and biases too.
    """

    method = "spectrum"

    def __init__(self, top_percent: float = 50.0, mode: str = "mp", rescan_epochs: int | None = None) -> None:
        self.top_percent = check_percent("top_percent", top_percent)
        self.mode = mode
        self._key = snr_key(mode)
        self.rescan_epochs = check_positive_int("rescan_epochs", rescan_epochs, allow_none=True)

    def needs_epochs(self) -> bool:
        return self.rescan_epochs is not None

    def weight_scores(self, step: int, steps_per_epoch: int | None) -> tuple[str, ...]:
        return ("snr" if self.mode == "mp" else "snr_compat",)

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return (self.rescan_epochs is not None and steps_per_epoch is not None
                and step % (steps_per_epoch * self.rescan_epochs) == 0)

    def select(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        out = {}
        for ranked in rank_by_snr(layers, scores, self._key, per_type=True):
            keep = int(len(ranked) * self.top_percent / 100)
            out.update({name: LayerDecision(Mode.FULL if i < keep else Mode.FROZEN) for i, name in enumerate(ranked)})
        return out

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return self.select(layers, scores)

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        return self.select(layers, scores)


@register_policy
class ALoRS(Policy):
    """ALoRS: high-SNR layers get LoRA at ``r_high``, mid-SNR layers LoRA at ``r_low``, the
    rest are frozen — over a 4-bit base by default (QLoRA).

    Args:
        high: percent of layers (per type with ``per_type``) in the high band, ``⌈n·high/100⌉``.
        mid: percent in the mid band, the next ``⌈n·mid/100⌉``; the rest are frozen.
        r_high, r_low: the two LoRA ranks (ALoRS: "high-rank" / "low-rank"; 16 and 4).
        mode: SNR flavour, ``"mp"`` or ``"compat"``.
        per_type: rank layers within their type (query against query), as Spectrum does,
            since SNR differs systematically between shapes.
        quantize: 4-bit base the optimizer builds (``"nf4"``; ``None`` for a plain base).

    The seed gives no band sizes; 25 % / 50 % is our default (a quarter frozen).
    """

    method = "alors"

    def __init__(self, high: float = 25.0, mid: float = 50.0, r_high: int = 16, r_low: int = 4, mode: str = "mp",
                 per_type: bool = True, quantize: Any = "nf4") -> None:
        self.high = check_percent("high", high)
        self.mid = check_percent("mid", mid)
        if self.high + self.mid > 100:
            raise ValueError(f"high + mid must be ≤ 100 percent, got {high} + {mid}")
        self.r_high = check_positive_int("r_high", r_high)
        self.r_low = check_positive_int("r_low", r_low)
        self.mode = mode
        self._key = snr_key(mode)
        self.per_type = bool(per_type)
        self.quantize = quantize

    def weight_scores(self, step: int, steps_per_epoch: int | None) -> tuple[str, ...]:
        return ("snr" if self.mode == "mp" else "snr_compat",)

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        out = {}
        for ranked in rank_by_snr(layers, scores, self._key, self.per_type):
            n_high = percent_count(self.high, len(ranked))
            n_mid = min(percent_count(self.mid, len(ranked)), len(ranked) - n_high)
            for i, name in enumerate(ranked):
                if i < n_high:
                    out[name] = LayerDecision(Mode.LORA, self.r_high)
                elif i < n_high + n_mid:
                    out[name] = LayerDecision(Mode.LORA, self.r_low)
                else:
                    out[name] = LayerDecision(Mode.FROZEN)
        return out
