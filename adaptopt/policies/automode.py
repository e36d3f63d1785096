"""AutoMode (docs/design.md §7): gradient importance decides, u times per epoch, which layers train fully."""
from __future__ import annotations

from typing import Mapping

from ..modes import Mode
from ..scores.gradient import GRANULARITIES, unit_importance, units
from .base import (
    LayerDecision,
    LayerView,
    Policy,
    Scores,
    check_percent,
    check_positive_int,
    evenly_spaced,
    percent_count,
    position_in_epoch,
    register_policy,
    require_epochs,
)


@register_policy
class AutoMode(Policy):
    r"""Start all-LoRA; ``u`` times per epoch rank the units by gradient importance and send
    the top ``t`` % to FULL, the bottom ``bottom`` % to FROZEN and the rest to LoRA.

    Args:
        u: decisions per epoch, evenly spaced, the last at the epoch's end (AutoMode's default: 6).
        t: percent of units fully fine-tuned, ``⌈n·t/100⌉`` of ``n`` (default: 10).
        bottom: percent of units frozen (default: 0).
        rank: LoRA rank of the LoRA units (``None``: the optimizer's ``rank``; seed: 16).
        granularity: ``"block"`` (default: all targets of a transformer block share a mode,
            scored by the norm of their joint gradient) or ``"module"`` (each target alone).
        score_steps: the statistics hooks are armed on the last ``score_steps`` steps before
            each decision (``None``: on every step); their importance is aggregated over them
            (:mod:`adaptopt.scores.gradient`, which also lists the extra cost of a scored step).

    AutoMode's README says "t=10 means the top 10 % most active layers are fully
    fine-tuned"; its notebook code does the opposite (``score >= percentile(scores, t)``
    sends ~90 % of layers to full). This follows the README. Ties rank in model order.
    """

    method = "automode"

    def __init__(self, u: int = 6, t: float = 10.0, bottom: float = 0.0, rank: int | None = None,
                 granularity: str = "block", score_steps: int | None = 8) -> None:
        self.u = check_positive_int("u", u)
        self.t = check_percent("t", t)
        self.bottom = check_percent("bottom", bottom)
        if self.t + self.bottom > 100:
            raise ValueError(f"t + bottom must be ≤ 100 (a unit cannot be both full and frozen), got {t} + {bottom}")
        self.rank = check_positive_int("rank", rank, allow_none=True)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        self.score_steps = check_positive_int("score_steps", score_steps, allow_none=True)

    def needs_epochs(self) -> bool:
        return True

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return {name: LayerDecision(Mode.LORA, self.rank) for name in layers}

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        spe = require_epochs(self, steps_per_epoch)
        return position_in_epoch(step, spe) in evenly_spaced(spe, self.u)

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        if self.score_steps is None:
            return True
        spe = require_epochs(self, steps_per_epoch)
        position = position_in_epoch(step, spe)
        next_decision = min(p for p in evenly_spaced(spe, self.u) if p >= position)
        return next_decision - position < self.score_steps

    def assign(self, importance: Mapping[str, float]) -> dict[str, Mode]:
        """The mode of each unit given its importance (pure; deterministic for equal input)."""
        position = {unit: i for i, unit in enumerate(importance)}
        ranked = sorted(importance, key=lambda unit: (-importance[unit], position[unit]))
        n_full = percent_count(self.t, len(ranked))
        n_frozen = min(percent_count(self.bottom, len(ranked)), len(ranked) - n_full)
        modes = {unit: Mode.LORA for unit in ranked}
        modes.update(dict.fromkeys(ranked[:n_full], Mode.FULL))
        modes.update(dict.fromkeys(ranked[len(ranked) - n_frozen:], Mode.FROZEN))
        return modes

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        groups = units(layers.values(), self.granularity)
        modes = self.assign(unit_importance(groups, scores))
        return {name: LayerDecision(modes[unit], self.rank if modes[unit] is Mode.LORA else None)
                for unit, names in groups.items() for name in names}
