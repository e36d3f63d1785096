"""Policies: every method adaptopt reproduces (docs/design.md §7) as a small object over one mechanism.

========================  ===========================================================  ======
policy                    what it does                                                 seed
========================  ===========================================================  ======
``Full``, ``LoRA(r)``     every target FULL / LoRA r                                   002
``QLoRA(r)``              LoRA r over a 4-bit (NF4) base                               002
``Frozen``, ``Fixed``     all frozen / a hand-written assignment                       —
``BitFit``                weights frozen, biases and head train                        000
``TopK(k)``               last k blocks FULL, the rest frozen                          000
``AutoMode(u, t)``        u×/epoch: top t % by gradient importance FULL, rest LoRA     000
``RankAllocation``        static per-layer ranks at a fixed-rank budget                001
``Spectrum(p)``           top p % per layer type by SNR FULL, rest frozen              002
``ALoRS``                 SNR bands → LoRA r_high / LoRA r_low / frozen, 4-bit base    003
``LayerwiseLR``           per-layer LR scales from SVD / CE / CS, one phase per epoch  004
========================  ===========================================================  ======

Composition: ``LayerwiseLR(base=...)`` puts its LR scales on top of any mode policy; the
mode policies do not stack (each owns every layer's mode).
"""
from .automode import AutoMode
from .base import (
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
from .layerwise_lr import LayerwiseLR
from .rank_allocation import STRATEGIES, RankAllocation, allocate_ranks
from .spectrum import ALoRS, Spectrum
from .static import BitFit, Fixed, Frozen, Full, LoRA, QLoRA, TopK

__all__ = [
    "ALoRS", "AutoMode", "BitFit", "Fixed", "Frozen", "Full", "LayerDecision", "LayerView", "LayerwiseLR", "LoRA",
    "POLICIES", "Policy", "QLoRA", "RankAllocation", "STRATEGIES", "Scores", "Spectrum", "TopK", "allocate_ranks",
    "build_policy", "name_matcher", "name_matches", "percent_count", "register_policy",
]
