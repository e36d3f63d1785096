r"""Adaptive LoRA rank allocation (docs/design.md §7): static per-layer ranks at a fixed budget.

Each layer ``ℓ`` (a LoRA of rank ``r`` over an ``out × in`` weight costs ``r·(in + out)``
parameters) gets a weight ``w_ℓ`` from the strategy, and ranks proportional to it with the
same total cost as a uniform rank-``R`` baseline:

.. math::  r_\ell \approx c\, w_\ell,\qquad \sum_\ell r_\ell (in_\ell + out_\ell) = R \sum_\ell (in_\ell + out_\ell)

(integers in ``[min_rank, min(max_rank, in, out)]``; the total lands within 2 % of the
baseline or the allocation is refused with the reason).
"""
from __future__ import annotations

import re
from typing import Mapping

from ..modes import Mode
from .base import LayerDecision, LayerView, Policy, Scores, check_positive_int, register_policy

STRATEGIES = ("linear_decay", "attention_high", "activation", "weight_norm")
BUDGET_TOLERANCE = 0.02
ATTENTION = re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value|q_lin|k_lin|v_lin|out_lin)")


def allocate_ranks(weights: Mapping[str, float], costs: Mapping[str, int], budget: float, min_rank: int = 1,
                   max_ranks: Mapping[str, int] | None = None) -> dict[str, int]:
    """Integer ranks ``≈ c·w`` whose cost ``Σ r·cost`` is as close to ``budget`` as the bounds allow.

    ``c`` is found by bisection on the clamped continuous ranks; the rounding error is then
    repaired by single ±1 moves (or a +1/−1 pair when no single move helps), each the one
    that strays least from the ideal ranks. When integer steps cannot reach the budget (a
    few tiny layers), the ideal is blended toward the uniform rank until they can. Raises
    ``ValueError`` if the result is more than 2 % off ``budget`` (bounds too tight for it).
    """
    names = list(weights)
    if not names:
        return {}
    bad = [n for n in names if not weights[n] > 0]
    if bad:
        raise ValueError(f"rank-allocation weights must be > 0; got {[(n, weights[n]) for n in bad[:5]]}")
    caps = {n: (max_ranks or {}).get(n, 1 << 30) for n in names}
    low = {n: min(min_rank, caps[n]) for n in names}

    def continuous(c: float) -> dict[str, float]:
        return {n: min(max(c * weights[n], low[n]), caps[n]) for n in names}

    def cost(ranks: Mapping[str, float]) -> float:
        return sum(ranks[n] * costs[n] for n in names)

    lo, hi = 0.0, 1.0
    while cost(continuous(hi)) < budget and hi < 1e12:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(continuous(mid)) < budget else (lo, mid)
    ideal = continuous(hi)
    uniform = {n: min(max(budget / sum(costs.values()), low[n]), caps[n]) for n in names}
    for blend in (1.0, 0.75, 0.5, 0.25, 0.0):  # tiny layers: integer rounding can need a nudge toward uniform
        target = {n: blend * ideal[n] + (1 - blend) * uniform[n] for n in names}
        ranks = {n: int(min(max(round(target[n]), low[n]), caps[n])) for n in names}
        while _improve(ranks, target, costs, low, caps, budget - cost(ranks)):
            pass
        if abs(cost(ranks) - budget) <= BUDGET_TOLERANCE * budget:
            break
    achieved = cost(ranks)
    if budget > 0 and abs(achieved - budget) > BUDGET_TOLERANCE * budget:
        raise ValueError(f"cannot allocate ranks within {BUDGET_TOLERANCE:.0%} of the budget {budget:,.0f} "
                         f"parameters (best {achieved:,.0f}): min_rank={min_rank} or the per-layer maxima "
                         "are too tight for it; change the budget or the bounds")
    return ranks


def _improve(ranks: dict[str, int], ideal: Mapping[str, float], costs: Mapping[str, int], low: Mapping[str, int],
             caps: Mapping[str, int], gap: float) -> bool:
    """One move that shrinks ``|gap|`` (budget − cost), in place; False when none does."""
    up = [n for n in ranks if ranks[n] < caps[n]]
    down = [n for n in ranks if ranks[n] > low[n]]
    singles = [(abs(gap - costs[n]), ranks[n] - ideal[n], n, None) for n in up if abs(gap - costs[n]) < abs(gap)]
    singles += [(abs(gap + costs[n]), ideal[n] - ranks[n], None, n) for n in down if abs(gap + costs[n]) < abs(gap)]
    moves = singles or [(abs(gap - costs[i] + costs[j]), ranks[i] - ideal[i] + ideal[j] - ranks[j], i, j)
                        for i in up for j in down if i != j and abs(gap - costs[i] + costs[j]) < abs(gap)]
    if not moves:
        return False
    _, _, grow, shrink = min(moves, key=lambda m: (m[1], m[0]))
    if grow is not None:
        ranks[grow] += 1
    if shrink is not None:
        ranks[shrink] -= 1
    return True


@register_policy
class RankAllocation(Policy):
    """Static per-layer LoRA ranks at the parameter budget of uniform rank ``budget``.

    Args:
        strategy: how ranks are weighted —
            ``"linear_decay"``: by depth, from 1 at the first block down to ``end_ratio`` at the last;
            ``"attention_high"``: attention projections ``attention_ratio`` × the MLP's;
            ``"activation"``: proportional to the RMS of each layer's input, measured by the
            statistics hooks over the first ``calibration_steps`` steps, after which the ranks
            are set (function-preserving rank changes);
            ``"weight_norm"``: proportional to ``rms(W) = ‖W‖_F/√(m·n)`` (size-free, so big
            matrices are not favoured twice).
        budget: the rank of the fixed-rank baseline whose trainable-parameter count to match
            (the source: 8 or 16); the total is within 2 % of it.
        min_rank, max_rank: bounds per layer (``max_rank`` also capped at ``min(in, out)``).
    """

    method = "rank_allocation"

    def __init__(self, strategy: str = "linear_decay", budget: int = 8, min_rank: int = 1,
                 max_rank: int | None = None, end_ratio: float = 0.25, attention_ratio: float = 2.0,
                 calibration_steps: int = 4) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.budget = check_positive_int("budget", budget)
        self.min_rank = check_positive_int("min_rank", min_rank)
        self.max_rank = check_positive_int("max_rank", max_rank, allow_none=True)
        if not 0 < end_ratio <= 1 or not attention_ratio > 0:
            raise ValueError(f"need 0 < end_ratio ≤ 1 and attention_ratio > 0, got {end_ratio}, {attention_ratio}")
        self.end_ratio = float(end_ratio)
        self.attention_ratio = float(attention_ratio)
        self.calibration_steps = check_positive_int("calibration_steps", calibration_steps)

    def weights(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, float]:
        """``w_ℓ`` of the strategy."""
        if self.strategy == "linear_decay":
            depths = sorted({v.block_index for v in layers.values() if v.block_index is not None})
            last = len(depths)  # layers outside blocks count as the deepest

            def depth(v: LayerView) -> int:
                return depths.index(v.block_index) if v.block_index is not None else last
            span = max(max((depth(v) for v in layers.values()), default=0), 1)
            return {n: 1 - (1 - self.end_ratio) * depth(v) / span for n, v in layers.items()}
        if self.strategy == "attention_high":
            return {n: self.attention_ratio if ATTENTION.search(n) else 1.0 for n in layers}
        key = "act_rms" if self.strategy == "activation" else "weight_rms"
        missing = [n for n in layers if key not in scores.get(n, {})]
        if missing:
            raise ValueError(f"strategy {self.strategy!r} needs the {key!r} score; missing for {missing[:5]}")
        return {n: scores[n][key] for n in layers}

    def allocate(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, int]:
        costs = {n: v.in_features + v.out_features for n, v in layers.items()}
        caps = {n: min(v.in_features, v.out_features, self.max_rank or 1 << 30) for n, v in layers.items()}
        return allocate_ranks(self.weights(layers, scores), costs, self.budget * sum(costs.values()),
                              self.min_rank, caps)

    def weight_scores(self, step: int, steps_per_epoch: int | None) -> tuple[str, ...]:
        return ("weight_norm",) if self.strategy == "weight_norm" and step == 0 else ()

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        if self.strategy == "activation":  # uniform at the budget rank until calibrated
            return {name: LayerDecision(Mode.LORA, self.budget) for name in layers}
        return {name: LayerDecision(Mode.LORA, r) for name, r in self.allocate(layers, scores).items()}

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        return self.strategy == "activation" and step <= self.calibration_steps

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return self.strategy == "activation" and step == self.calibration_steps

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        return {name: LayerDecision(Mode.LORA, r) for name, r in self.allocate(layers, scores).items()}
