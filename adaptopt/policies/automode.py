"""AutoMode (docs/design.md §7): gradient importance decides, u times per epoch, which layers train fully."""
from __future__ import annotations

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
    evenly_spaced,
    percent_count,
    position_in_epoch,
    register_policy,
    require_epochs,
    size_scores,
    spend_on_full,
    units_in_mode,
)

FREEZE_ORDERS = ("prefix", "importance")


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
        score: ``"cheap"`` (default: each layer's gradient norm estimated from what backward
            computes anyway, :mod:`adaptopt.training.gradient_probes`), ``"probed"`` (LoRA layers also
            random-probed: closer to exact while adapters are fresh, ~9% more per scored step)
            or ``"exact"`` (``‖δᵀx‖_F``, one weight-gradient-sized GEMM per layer per scored step).
        freeze_from: progressive freezing (the source's "dynamic pruning"): from this decision on
            (1 = the first), ``freeze_step`` % more of the units are frozen at every decision, up
            to ``freeze_max`` %, for good: a frozen unit is never scored or unfrozen again.
            ``None`` (default): no progressive freezing.
        freeze_step, freeze_max: percent of units frozen per decision, and at most (< 100: at
            least one unit always trains).
        freeze_order: which units freeze: ``"prefix"`` (default: the lowest blocks in model
            order, so the frozen units form a prefix of the network and backward stops there)
            or ``"importance"`` (the least important units, wherever they are).
        keep: hysteresis for FULL units (default 0: none). A unit that is FULL competes for the
            FULL slots with its importance multiplied by ``1 + keep``, so a LoRA unit displaces
            it only when ``I_challenger > (1 + keep)·I_incumbent``. Without it, close scores let
            the choice jump between blocks at every decision and no block trains fully for long.

    AutoMode's README says "t=10 means the top 10 % most active layers are fully
    fine-tuned"; its notebook code does the opposite (``score >= percentile(scores, t)``
    sends ~90 % of layers to full). This follows the README. Ties rank in model order.

    Under a memory budget (``AdaptiveOptimizer(memory_budget=)``) ``t`` is replaced by the budget:
    at each decision units become FULL in order of held importance while the assignment fits.
    """

    method = "automode"
    spends_budget = True

    def __init__(self, u: int = 6, t: float = 10.0, bottom: float = 0.0, rank: int | None = None,
                 granularity: str = "block", score_steps: int | None = 8, score: str = "cheap",
                 freeze_from: int | None = None, freeze_step: float = 20.0, freeze_max: float = 50.0,
                 freeze_order: str = "prefix", keep: float = 0.0) -> None:
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
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score
        self.freeze_from = check_positive_int("freeze_from", freeze_from, allow_none=True)
        self.freeze_step = check_percent("freeze_step", freeze_step)
        self.freeze_max = check_percent("freeze_max", freeze_max)
        if self.freeze_max >= 100:
            raise ValueError(f"freeze_max must be < 100 (a schedule must never freeze every unit), got {freeze_max}")
        if freeze_order not in FREEZE_ORDERS:
            raise ValueError(f"freeze_order must be one of {FREEZE_ORDERS}, got {freeze_order!r}")
        self.freeze_order = freeze_order
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 <= keep < float("inf"):
            raise ValueError(f"keep must be a finite number ≥ 0 (0.5: a FULL unit stays unless another unit's "
                             f"importance exceeds its own by 50%), got {keep!r}")
        self.keep = float(keep)
        if self.freeze_from is not None and self.bottom > 0:
            raise ValueError("bottom (frozen for one interval, rescored) and freeze_from (frozen for good, never "
                             "scored) do not combine: use one of them")

    def needs_epochs(self) -> bool:
        return True

    def statistics(self) -> Statistics:
        return Statistics(self.score, activations=False, frozen_layers=not self.freezes())

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

    def assign(self, importance: Mapping[str, float], full_now: frozenset[str] = frozenset(),
               within: tuple[Mapping[str, list[str]], Mapping[str, LayerView]] | None = None) -> dict[str, Mode]:
        """The mode of each unit given its importance and the units FULL now (pure;
        deterministic for equal input). The FULL slots go by ``I·(1 + keep)`` for units in
        ``full_now``, ``I`` for the others; LoRA and FROZEN by ``I``. Under a budget the FULL
        slots are as many as fit with every other unit in LoRA (``within``: the units' layers
        and the views)."""
        position = {unit: i for i, unit in enumerate(importance)}
        held = {u: v * (1.0 + self.keep) if u in full_now else v for u, v in importance.items()}
        by_held = sorted(importance, key=lambda unit: (-held[unit], position[unit]))
        groups, views = within if within is not None else ({}, {})
        full = spend_on_full(by_held, percent_count(self.t, len(by_held)), {u: groups[u] for u in by_held} if within
                             else {}, views, lambda u: LayerDecision(Mode.LORA, self.rank),
                             self.memory_budget if within else None)
        n_full = len(full)
        rest = sorted((u for u in importance if u not in full), key=lambda unit: (-importance[unit], position[unit]))
        ranked = full + rest
        n_frozen = min(percent_count(self.bottom, len(ranked)), len(ranked) - n_full)
        modes = {unit: Mode.LORA for unit in ranked}
        modes.update(dict.fromkeys(ranked[:n_full], Mode.FULL))
        modes.update(dict.fromkeys(ranked[len(ranked) - n_frozen:], Mode.FROZEN))
        return modes

    def peak_assignment(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        """A decision with nothing frozen yet: the top ``t`` % units FULL (the largest), the rest LoRA."""
        groups = units(layers.values(), self.granularity)
        modes = self.assign(unit_importance(groups, size_scores(layers)), within=(groups, layers))
        return {name: LayerDecision(Mode.LORA if modes[unit] is Mode.FROZEN else modes[unit],
                                    self.rank if modes[unit] is not Mode.FULL else None)
                for unit, names in groups.items() for name in names}

    def freezes(self) -> bool:
        return self.freeze_from is not None

    def decision_number(self, step: int, steps_per_epoch: int | None) -> int:
        """Which decision (1-based, counted over all epochs) completed step ``step`` is."""
        spe = require_epochs(self, steps_per_epoch)
        positions = sorted(evenly_spaced(spe, self.u))
        position = position_in_epoch(step, spe)
        return (step - 1) // spe * len(positions) + sum(p <= position for p in positions)

    def frozen_count(self, decision: int, n: int) -> int:
        """How many of ``n`` units are frozen for good after decision number ``decision``
        (1-based): ``freeze_step`` % more per decision from ``freeze_from`` on, at most
        ``freeze_max`` % and never all."""
        if self.freeze_from is None or decision < self.freeze_from:
            return 0
        percent = min(self.freeze_max, self.freeze_step * (decision - self.freeze_from + 1))
        return min(percent_count(percent, n), n - 1)

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        groups = units(layers.values(), self.granularity)
        retired = units_in_mode(groups, layers, Mode.FROZEN) if self.freezes() else []
        active = {u: names for u, names in groups.items() if u not in retired}
        importance = unit_importance(active, scores)
        extra = max(0, self.frozen_count(self.decision_number(step, steps_per_epoch), len(groups)) - len(retired))
        if extra:
            order = (list(active) if self.freeze_order == "prefix"
                     else sorted(active, key=lambda u: (importance[u], list(active).index(u))))
            retired += order[:extra]
            importance = {u: v for u, v in importance.items() if u not in retired}
        full_now = frozenset(units_in_mode(active, layers, Mode.FULL))
        modes = {**self.assign(importance, full_now, within=(groups, layers)), **dict.fromkeys(retired, Mode.FROZEN)}
        return {name: LayerDecision(modes[unit], self.rank if modes[unit] is Mode.LORA else None)
                for unit, names in groups.items() for name in names}
