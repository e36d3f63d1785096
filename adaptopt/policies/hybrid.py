"""Calibrate, then fix (the shape of Hybrid-LoRA): score every block over a short window at the
start, then train the top ``t`` % of blocks fully and the rest with LoRA for the whole run."""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Mapping

from ..modes import Mode
from ..name_patterns import HEAD_INPUTS
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
    size_scores,
    spend_on_full,
    units_in_mode,
)


@register_policy
class Hybrid(Policy):
    r"""All-LoRA for ``calibration_steps`` steps while gradient importance is scored; then,
    once and for good: the lowest ``freeze_prefix`` % of units in model order FROZEN (a frozen
    prefix: backward stops above it), the top ``t`` % of the units above it FULL, the rest LoRA at
    ``rank``.

    Args:
        t: percent of units trained fully, ``⌈n·t/100⌉`` (default 33: two of MiniLM's six blocks).
        calibration_steps: steps scored before the one decision (default 1: the earlier the
            decision, the more steps the chosen blocks train FULL; deciding after the first step
            won on the task suite's validation splits against 4 and 12 steps). With 1, a scoring
            pass before training (:meth:`~adaptopt.AdaptiveOptimizer.score_before_training`, which the
            HF Trainer callback runs on the first batch) scores that batch instead and the decision
            comes before the first update, so the chosen units train FULL from it, as the run's
            static twin does; without the pass, the decision follows the first update.
        freeze_prefix: percent of units, counted from the bottom of the network, frozen from
            ``freeze_at`` on (default 33; 0: none). The prefix stops below the first unit chosen
            FULL (none is, with ``full_above_prefix``), and at least one unit always trains.
        freeze_at: when the prefix freezes: a fraction of the run in (0, 1) (default 0.6; needs
            the run's length, ``AdaptiveOptimizer(total_steps=)``, which the HF and Lightning
            callbacks set — without it the prefix never freezes, with a warning), a step after
            ``calibration_steps``, or ``None``: at the decision. Late freezing lets the prefix
            train with LoRA first and saves its backward pass for the rest of the run (a second
            decision that reads no scores and keeps the FULL choice).
        full_above_prefix: FULL units are ranked only among the units above the prefix, so the
            prefix is always the lowest ``freeze_prefix`` % and its backward pass is always saved
            (default True, chosen in the suite's seventh validation round: on SmolLM2, whose lowest
            blocks score highest, the earlier rule — ``False``: the most important units FULL wherever
            they are, the prefix cut below the lowest of them — left no prefix to freeze and cost
            1.36× LoRA's time on chitchat's validation part, this rule 1.13×, at 0.58 perplexity more
            — though by step timing the late prefix saves ~6% of a step, within this machine's noise;
            on MiniLM both rules chose the same blocks).
        rank: LoRA rank of the LoRA units (``None``: the optimizer's ``rank``).
        granularity, score: as for :class:`~adaptopt.AutoMode`.
        output_lora: a language model's output layer gets a LoRA adapter (at the optimizer's
            ``rank``) that trains all run and is not ranked with the blocks (default True: on the
            suite's language-modelling validation task it raised the share of Full's lead from 24%
            to 38% at about LoRA's time; a classifier has no output layer, so nothing changes there).
            ``AdaptiveOptimizer(train_embeddings=...)`` overrides it.
        head_inputs: the dense layers that feed a classifier's head (BERT's pooler, DistilBERT's
            ``pre_classifier``: :data:`adaptopt.name_patterns.HEAD_INPUTS`) train fully with the head
            (default True: MiniLM's pooler is left from pre-training, Full trains it, LoRA with
            PEFT's ``modules_to_save`` does not; training it raised the suite's classification
            validation shares from 20% / 93% to 73% / over 100%, at no measurable time).

    Under a memory budget (``AdaptiveOptimizer(memory_budget=)``) ``t`` is replaced by the budget:
    units become FULL in order of importance while the assignment fits (docs/optimizer.md).

    Unlike AutoMode it needs no epoch length and scores only at the start; after calibration
    its cost is that of its fixed assignment, less the prefix's backward pass once it freezes.
    The defaults (t=33, the lowest third frozen for the last 40% of the run) won the settings
    search on the main job's validation data; ``calibration_steps=1`` was chosen on the task suite's
    validation splits against 4 and 12 steps and against budgets of LoRA + 25%, ``full_above_prefix``
    against the earlier rule, an earlier freeze and more FULL units (docs/policies.md, "The default").
    """

    method = "hybrid"
    spends_budget = True

    def __init__(self, t: float = 33.0, calibration_steps: int = 1, freeze_prefix: float = 33.0,
                 rank: int | None = None, granularity: str = "block", score: str = "cheap",
                 freeze_at: float | None = 0.6, output_lora: bool = True, head_inputs: bool = True,
                 full_above_prefix: bool = True) -> None:
        self.t = check_percent("t", t)
        self.calibration_steps = check_positive_int("calibration_steps", calibration_steps)
        self.freeze_prefix = check_percent("freeze_prefix", freeze_prefix)
        if self.freeze_prefix >= 100:
            raise ValueError(f"freeze_prefix must be < 100 (at least one unit trains), got {freeze_prefix}")
        fraction = isinstance(freeze_at, float) and 0 < freeze_at < 1
        if not (freeze_at is None or fraction or (isinstance(freeze_at, int) and not isinstance(freeze_at, bool)
                                                  and freeze_at > self.calibration_steps)):
            raise ValueError(f"freeze_at must be a fraction of the run in (0, 1), a step after calibration_steps="
                             f"{calibration_steps}, or None (at the decision); got {freeze_at!r}")
        self.freeze_at = freeze_at
        flags = {"output_lora": output_lora, "head_inputs": head_inputs, "full_above_prefix": full_above_prefix}
        wrong = {k: v for k, v in flags.items() if not isinstance(v, bool)}
        if wrong:
            raise ValueError(f"{', '.join(wrong)} must be true or false, got {', '.join(map(repr, wrong.values()))}")
        self.full_above_prefix = full_above_prefix
        self.output_lora = self.adapts_output_layer = output_lora
        self.head_inputs = head_inputs
        self._warned = False
        self.rank = check_positive_int("rank", rank, allow_none=True)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score

    def statistics(self) -> Statistics:
        return Statistics(self.score, activations=False)

    def trainable_extra(self) -> tuple[str, ...]:
        return HEAD_INPUTS if self.head_inputs else ()

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return {name: LayerDecision(Mode.LORA, self.rank) for name in layers}

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        return not self.scored_before_training and step <= self.calibration_steps

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return step in (self.decision_step(), self.freeze_step())

    def decides_before_training(self) -> bool:
        return self.calibration_steps == 1

    def decision_step(self) -> int:
        """The step after which the one decision is made: ``calibration_steps``, or 0 when a
        scoring pass before training scored the first batch instead."""
        return 0 if self.scored_before_training else self.calibration_steps

    def freeze_step(self) -> int | None:
        """The step after which the prefix freezes (``None``: no prefix, or a fraction of a run
        of unknown length): :meth:`freeze_step_of` this run."""
        return self.freeze_step_of(self.decision_step(), self.run_steps)

    def freeze_step_of(self, decision: int, run_steps: int | None) -> int | None:
        """The prefix's freeze step for a decision after step ``decision`` in a run of ``run_steps``:
        ``max(decision, ⌈freeze_at·run_steps⌉)`` for a fraction, the step itself for a step, the
        decision for ``None``; ``None`` without a prefix or for a fraction of an unknown length."""
        if not self.freeze_prefix:
            return None
        if self.freeze_at is None:
            return decision
        if isinstance(self.freeze_at, int):
            return self.freeze_at
        if run_steps is None:
            return None
        return max(decision, math.ceil(self.freeze_at * run_steps))

    def peak_assignment(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        """After the decision, before the prefix freezes: the top ``t`` % units FULL (the largest)."""
        return self.sized_assignment(layers, with_prefix=False)

    def run_phases(self, layers: Mapping[str, LayerView], run_steps: int) -> list[tuple[int, dict[str, LayerDecision]]]:
        """All LoRA while calibrating (no steps when a scoring pass decides before training, as the HF
        Trainer callback does), the peak assignment until the prefix freezes, then with it frozen."""
        decision = min(0 if self.decides_before_training() else self.calibration_steps, run_steps)
        freeze = self.freeze_step_of(decision, run_steps)
        freeze = run_steps if freeze is None else min(freeze, run_steps)
        phases = [(decision, self.initial(layers, {})), (freeze - decision, self.peak_assignment(layers)),
                  (run_steps - freeze, self.sized_assignment(layers, with_prefix=True))]
        return [(steps, assignment) for steps, assignment in phases if steps > 0]

    def sized_assignment(self, layers: Mapping[str, LayerView], with_prefix: bool) -> dict[str, LayerDecision]:
        """:meth:`assign` with every unit's importance its size (the largest FULL)."""
        groups = units(layers.values(), self.granularity)
        modes = self.assign(unit_importance(groups, size_scores(layers)), with_prefix=with_prefix,
                            within=(groups, layers))
        return {name: LayerDecision(modes[unit], self.rank if modes[unit] is Mode.LORA else None)
                for unit, names in groups.items() for name in names}

    def placed_by_run_length(self) -> dict[str, int]:
        step = self.freeze_step()
        return {"the prefix freezes after step": step} if isinstance(self.freeze_at, float) and step else {}

    def assign(self, importance: Mapping[str, float], with_prefix: bool = True,
               within: tuple[Mapping[str, list[str]], Mapping[str, LayerView]] | None = None) -> dict[str, Mode]:
        """Units in model order → modes (pure): top ``t`` % FULL (under a budget: as many as fit,
        ``within`` = the units' layers and the views; with ``full_above_prefix``, ranked among the
        units above the prefix only), then the bottom prefix FROZEN."""
        order = list(importance)
        reserved = set(self.bottom(order)) if self.full_above_prefix else set()
        ranked = sorted((u for u in order if u not in reserved), key=lambda u: (-importance[u], order.index(u)))
        groups, views = within if within is not None else ({}, {})
        full = set(spend_on_full(ranked, percent_count(self.t, len(order)), groups, views,
                                 lambda u: LayerDecision(Mode.LORA, self.rank), self.memory_budget if within else None))
        prefix = self.prefix(order, full) if with_prefix else []
        return {u: Mode.FULL if u in full else Mode.FROZEN if u in prefix else Mode.LORA for u in order}

    def bottom(self, order: list[str]) -> list[str]:
        """The lowest ``freeze_prefix`` % of ``order``, ``⌈n·p/100⌉`` units: where the prefix may lie."""
        return order[:percent_count(self.freeze_prefix, len(order))]

    def prefix(self, order: list[str], full: set[str]) -> list[str]:
        """:meth:`bottom`, cut below the first FULL unit, never all the units that are not FULL."""
        prefix = list(itertools.takewhile(lambda u: u not in full, self.bottom(order)))
        return prefix[:max(0, len(order) - len(full) - 1)]

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        groups = units(layers.values(), self.granularity)
        freeze_step = self.freeze_step()
        if freeze_step is None and self.freeze_prefix and not self._warned:
            self._warned = True
            warnings.warn(f"Hybrid: freeze_at={self.freeze_at} is a fraction of the run, but the optimizer does not "
                          "know the run's length, so the prefix will not freeze. Pass total_steps= to "
                          "AdaptiveOptimizer or call opt.set_total_steps(n) (the HF Trainer and Lightning "
                          "callbacks do), or give freeze_at as a step", stacklevel=2)
        if step == freeze_step and step != self.decision_step():
            full = set(units_in_mode(groups, layers, Mode.FULL))
            return {name: LayerDecision(Mode.FROZEN) for unit in self.prefix(list(groups), full)
                    for name in groups[unit]}
        modes = self.assign(unit_importance(groups, scores), with_prefix=freeze_step == self.decision_step(),
                            within=(groups, layers))
        return {name: LayerDecision(modes[unit], self.rank if modes[unit] is Mode.LORA else None)
                for unit, names in groups.items() for name in names}
