"""Sampled blocks: full fine-tuning quality at a fraction of its memory by training only a few
blocks fully at a time and freezing the rest — no adapters (docs/policies.md).

- **LISA** (Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large
  Language Model Fine-Tuning", arXiv 2403.17919, Algorithm 1): every ``period`` steps, ``gamma``
  blocks are sampled to train fully, every other block is frozen; the embeddings and the output
  head always train. Defaults are the reference implementation's (LMFlow,
  ``--lisa_activated_layers 1 --lisa_interval_steps 20``): ``gamma=1``, ``period=20``.
- **BAdam** (Luo et al., 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for
  Large Language Models", arXiv 2404.02827, Algorithm 1, block coordinate descent with Adam): one
  block trains fully for ``period`` steps, then the next, in ``order``; the embeddings and head do
  not train. Defaults are the reference implementation's (``BlockOptimizer``:
  ``switch_block_every=50``, ``switch_mode="descending"``): ``period=50``, ``order="descending"``.

Both run on the optimizer's exact FROZEN ↔ FULL moves: a block leaving training gets
``grad=None`` and its Adam state dropped, a block entering starts with fresh moments (BAdam's
reference resets them too; LISA's kept them, the memory complaint of its users). Sampling is
seeded by the period's index, so a resumed run draws the same blocks; with ``weighted=True`` LISA
samples by gradient importance (the cheap score, gathered on the ``score_steps`` steps before each
draw) instead of uniformly — our scores are nearly free.

Under a memory budget (``AdaptiveOptimizer(memory_budget=)``) the number of blocks trained at a
time is the budget's: as many as fit when the largest blocks are the ones drawn (so every draw
fits) — LISA draws that many, BAdam trains a window of that many consecutive blocks in its order.
"""
from __future__ import annotations

import random
from typing import Mapping

from ..modes import Mode
from ..name_patterns import EMBEDDINGS
from ..scores.gradient import unit_importance, units
from .base import (
    LayerDecision,
    LayerView,
    OverBudget,
    Policy,
    Scores,
    Statistics,
    check_positive_int,
    register_policy,
    size_scores,
)

ORDERS = ("descending", "ascending", "random")


class SampledBlocks(Policy):
    """Every ``period`` steps, a set of blocks trains fully and the others are frozen."""

    period: int
    train_embeddings: bool
    seed: int
    spends_budget = True

    def blocks(self, layers: Mapping[str, LayerView]) -> dict[str, list[str]]:
        groups = units(layers.values(), "block")
        if not any(v.block_index is not None for v in layers.values()):
            raise ValueError(f"{type(self).__name__} samples transformer blocks, but this model's targets have no "
                             "block index (e.g. 'model.layers.3.…')")
        return groups

    def choose(self, groups: Mapping[str, list[str]], scores: Scores, index: int, width: int) -> list[str]:
        """The ``width`` units that train in sampling period ``index`` (0 = the start), in the
        order they were drawn."""
        raise NotImplementedError

    def width(self, groups: Mapping[str, list[str]], layers: Mapping[str, LayerView]) -> int:
        """Blocks trained at a time: :meth:`active_count`, or under a budget as many as fit when
        the largest blocks are the ones drawn (so every draw fits)."""
        if self.memory_budget is None:
            return min(self.active_count(), len(groups))
        sizes = unit_importance(groups, size_scores(layers))
        largest = sorted(groups, key=lambda u: -sizes[u])
        def with_full(count: int) -> dict[str, LayerDecision]:
            return {name: LayerDecision(Mode.FULL if unit in largest[:count] else Mode.FROZEN)
                    for unit, names in groups.items() for name in names}
        width = 0
        while width < len(largest) and self.memory_budget.fits(layers, with_full(width + 1)):
            width += 1
        if width == 0:
            need = self.memory_budget.cost_of(layers, with_full(1))
            raise OverBudget(f"{type(self).__name__}: memory_budget {self.memory_budget.limit / 1e9:.3g} GB fits no "
                             f"block: training the largest one needs {need / 1e9:.3g} GB. Raise the budget"
                             + (", or pass train_embeddings=False" if self.train_embeddings else ""))
        return width

    def assignment(self, layers: Mapping[str, LayerView], scores: Scores, index: int) -> dict[str, LayerDecision]:
        groups = self.blocks(layers)
        chosen = set(self.choose(groups, scores, index, self.width(groups, layers)))
        return {name: LayerDecision(Mode.FULL if unit in chosen else Mode.FROZEN)
                for unit, names in groups.items() for name in names}

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return self.assignment(layers, scores, 0)

    def peak_assignment(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        """The largest blocks a draw can pick, FULL; the rest frozen."""
        groups = self.blocks(layers)
        sizes = unit_importance(groups, size_scores(layers))
        largest = set(sorted(groups, key=lambda u: -sizes[u])[:self.width(groups, layers)])
        return {name: LayerDecision(Mode.FULL if unit in largest else Mode.FROZEN)
                for unit, names in groups.items() for name in names}

    def run_phases(self, layers: Mapping[str, LayerView], run_steps: int) -> list[tuple[int, dict[str, LayerDecision]]]:
        """Each sampling period's draw for its steps (exact for uniform draws and BAdam's orders,
        which read no scores; a weighted draw is taken with every score a layer's size)."""
        scores = size_scores(layers)
        return [(min(self.period, run_steps - start), self.assignment(layers, scores, start // self.period))
                for start in range(0, run_steps, self.period)]

    def active_count(self) -> int:
        """How many blocks train at a time."""
        return 1

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return step % self.period == 0

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        return self.assignment(layers, scores, step // self.period)

    def trainable_extra(self) -> tuple[str, ...]:
        return EMBEDDINGS if self.train_embeddings else ()

    def rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index)


@register_policy
class LISA(SampledBlocks):
    """LISA: ``gamma`` blocks sampled every ``period`` steps train fully, the rest are frozen.

    Args:
        gamma: blocks trained at a time (LMFlow's default 1).
        period: steps between draws, K (LMFlow's default 20).
        weighted: sample by gradient importance instead of uniformly (without replacement,
            probability ∝ the block's score over the last ``score_steps`` steps of the period).
        train_embeddings: the embeddings and the output head train throughout (LISA: yes).
        score_steps: steps scored before each weighted draw.
        seed: the sampling seed (each period's draw is seeded by it and the period's index).
    """

    method = "lisa"

    def __init__(self, gamma: int = 1, period: int = 20, weighted: bool = False, train_embeddings: bool = True,
                 score_steps: int = 4, seed: int = 0) -> None:
        self.gamma = check_positive_int("gamma", gamma)
        self.period = check_positive_int("period", period)
        if not isinstance(weighted, bool) or not isinstance(train_embeddings, bool):
            raise ValueError(f"weighted and train_embeddings are true or false, got {weighted!r}, {train_embeddings!r}")
        self.weighted, self.train_embeddings = weighted, train_embeddings
        self.score_steps = check_positive_int("score_steps", score_steps)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def statistics(self) -> Statistics:
        return Statistics("cheap" if self.weighted else None, activations=False, frozen_layers=True)

    def active_count(self) -> int:
        return self.gamma

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        return self.weighted and (-step) % self.period < self.score_steps

    def choose(self, groups: Mapping[str, list[str]], scores: Scores, index: int, width: int) -> list[str]:
        order = list(groups)
        k = min(width, len(order))
        rng = self.rng(index)
        if not self.weighted or index == 0:  # the first draw has no scores yet: uniform
            return rng.sample(order, k)
        weights = unit_importance(groups, scores)
        chosen: list[str] = []
        pool = {u: max(weights[u], 0.0) for u in order}
        for _ in range(k):  # without replacement, each draw ∝ the remaining weights
            if sum(pool.values()) <= 0:
                return chosen + rng.sample(list(pool), k - len(chosen))
            unit = rng.choices(list(pool), weights=list(pool.values()))[0]
            chosen.append(unit)
            del pool[unit]
        return chosen


@register_policy
class BAdam(SampledBlocks):
    """BAdam: one block trains fully for ``period`` steps, then the next in ``order``; the rest are frozen.

    Args:
        period: steps per block, K (the reference's ``switch_block_every=50``).
        order: ``"descending"`` (the reference's default: the last block first), ``"ascending"``, or
            ``"random"`` (a fresh permutation of the blocks for every pass over them).
        train_embeddings: the embeddings and the output head train throughout (BAdam: no).
        seed: the seed of the random order.
    """

    method = "badam"

    def __init__(self, period: int = 50, order: str = "descending", train_embeddings: bool = False,
                 seed: int = 0) -> None:
        self.period = check_positive_int("period", period)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order = order
        if not isinstance(train_embeddings, bool):
            raise ValueError(f"train_embeddings is true or false, got {train_embeddings!r}")
        self.train_embeddings = train_embeddings
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def choose(self, groups: Mapping[str, list[str]], scores: Scores, index: int, width: int) -> list[str]:
        """Period ``index`` trains the ``index``-th window of ``width`` consecutive blocks of the
        pass order (a window never wraps into the next pass; the last one of a pass may be narrower)."""
        order = list(groups)
        n = len(order)
        windows = -(-n // width)
        cycle, slot = divmod(index, windows)
        if self.order == "descending":
            sequence = order[::-1]
        elif self.order == "ascending":
            sequence = order
        else:
            sequence = order[:]
            self.rng(cycle).shuffle(sequence)
        return sequence[slot * width:(slot + 1) * width]
