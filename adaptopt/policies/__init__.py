"""Policies: every method adaptopt reproduces (docs/design.md §7) as a small object over one mechanism.

========================  ===========================================================  ==============
policy                    what it does                                                 source
========================  ===========================================================  ==============
``Full``, ``LoRA(r)``     every target FULL / LoRA r                                   framework
``QLoRA(r)``              LoRA r over a 4-bit (NF4) base                               framework
``Frozen``, ``Fixed``     all frozen / a hand-written assignment                       —
``BitFit``                weights frozen, biases and head train                        AutoMode
``TopK(k, rest)``         last k blocks FULL, the rest frozen (or LoRA)                AutoMode
``Scheduled(plan)``       assignments fixed by step (an adaptive policy's static twin) —
``AutoMode(u, t)``        u×/epoch: top t % by gradient importance FULL, rest LoRA;    AutoMode
                          optionally a growing frozen prefix (progressive freezing)
``Hybrid(t)``             score a short window, then top t % FULL, rest LoRA, fixed    Hybrid-LoRA
``RankAllocation``        static per-layer ranks at a fixed-rank budget                adaptive ranks
``Spectrum(p)``           top p % per layer type by SNR FULL, rest frozen              framework
``ALoRS``                 SNR bands → LoRA r_high / LoRA r_low / frozen, 4-bit base    ALoRS
``LayerwiseLR``           per-layer LR scales from SVD / CE / CS, one phase per epoch  layer-wise LR
``LISA(gamma, period)``   gamma sampled blocks FULL for period steps, rest frozen      LISA
``BAdam(period, order)``  one block FULL for period steps, then the next               BAdam
========================  ===========================================================  ==============

The sources are described in docs/design.md §7.

Composition: ``LayerwiseLR(base=...)`` puts its LR scales on top of any mode policy; the
mode policies do not stack (each owns every layer's mode).
"""
from .automode import AutoMode
from .base import (
    DEFAULT_POLICY,
    POLICIES,
    LayerDecision,
    LayerView,
    Policy,
    Scores,
    build_policy,
    name_matcher,
    name_matches,
    percent_count,
    register_policy,
)
from .hybrid import Hybrid
from .layerwise_lr import LayerwiseLR
from .rank_allocation import STRATEGIES, RankAllocation, allocate_ranks
from .sampled_blocks import LISA, BAdam
from .spectrum import ALoRS, Spectrum
from .static import BitFit, Fixed, Frozen, Full, LoRA, QLoRA, Scheduled, TopK

__all__ = [
    "ALoRS", "AutoMode", "BAdam", "BitFit", "DEFAULT_POLICY", "LISA", "Fixed", "Frozen", "Full", "Hybrid",
    "LayerDecision", "LayerView", "LayerwiseLR", "LoRA", "POLICIES", "Policy", "QLoRA", "RankAllocation", "STRATEGIES",
    "Scheduled", "Scores", "Spectrum", "TopK", "allocate_ranks", "build_policy", "name_matcher", "name_matches",
    "percent_count", "register_policy",
]
