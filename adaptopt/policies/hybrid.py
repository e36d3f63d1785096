"""Calibrate, then fix (the shape of Hybrid-LoRA): score every block over a short window at the
start, then train the top ``t`` % of blocks fully and the rest with LoRA for the whole run."""
from __future__ import annotations

import itertools
from typing import Mapping

from ..modes import Mode
from ..scores.gradient import GRANULARITIES, unit_importance, units
from .base import (
    SCORES,
    LayerDecision,
    LayerView,
    Policy,
    Scores,
    Statistics,
    check_percent,
    check_positive_int,
    percent_count,
    register_policy,
)


@register_policy
class Hybrid(Policy):
    r"""All-LoRA for ``calibration_steps`` steps while gradient importance is scored; then,
    once and for good: the top ``t`` % of units FULL, the lowest ``freeze_prefix`` % of units in
    model order FROZEN (a frozen prefix: backward stops above it), the rest LoRA at ``rank``.

    Args:
        t: percent of units trained fully, ``⌈n·t/100⌉`` (default 33: two of MiniLM's six blocks).
        calibration_steps: steps scored before the one decision (default 20).
        freeze_prefix: percent of units, counted from the bottom of the network, frozen after
            the decision (default 0). The prefix stops below the first unit chosen FULL, and at
            least one unit always trains.
        rank: LoRA rank of the LoRA units (``None``: the optimizer's ``rank``).
        granularity, score: as for :class:`~adaptopt.AutoMode`.

    Unlike AutoMode it needs no epoch length, scores only at the start, and makes exactly one
    decision, so its cost after calibration is that of its fixed assignment.
    """

    method = "hybrid"

    def __init__(self, t: float = 33.0, calibration_steps: int = 20, freeze_prefix: float = 0.0,
                 rank: int | None = None, granularity: str = "block", score: str = "cheap") -> None:
        self.t = check_percent("t", t)
        self.calibration_steps = check_positive_int("calibration_steps", calibration_steps)
        self.freeze_prefix = check_percent("freeze_prefix", freeze_prefix)
        if self.freeze_prefix >= 100:
            raise ValueError(f"freeze_prefix must be < 100 (at least one unit trains), got {freeze_prefix}")
        self.rank = check_positive_int("rank", rank, allow_none=True)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score

    def statistics(self) -> Statistics:
        return Statistics(self.score, activations=False)

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return {name: LayerDecision(Mode.LORA, self.rank) for name in layers}

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        return step <= self.calibration_steps

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return step == self.calibration_steps

    def assign(self, importance: Mapping[str, float]) -> dict[str, Mode]:
        """Units in model order → modes (pure): top ``t`` % FULL, then the bottom prefix FROZEN."""
        order = list(importance)
        ranked = sorted(order, key=lambda u: (-importance[u], order.index(u)))
        full = set(ranked[:percent_count(self.t, len(order))])
        bottom = order[:percent_count(self.freeze_prefix, len(order))]
        prefix = list(itertools.takewhile(lambda u: u not in full, bottom))
        prefix = prefix[:max(0, len(order) - len(full) - 1)]
        return {u: Mode.FULL if u in full else Mode.FROZEN if u in prefix else Mode.LORA for u in order}

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        groups = units(layers.values(), self.granularity)
        modes = self.assign(unit_importance(groups, scores))
        return {name: LayerDecision(modes[unit], self.rank if modes[unit] is Mode.LORA else None)
                for unit, names in groups.items() for name in names}
