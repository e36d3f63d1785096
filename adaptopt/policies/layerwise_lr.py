r"""Layer-wise learning rates from SVD / CE / CS weight metrics, resolved as docs/design.md §7 says.

At the start of epoch ``e`` the phase is ``phases[e mod len(phases)]`` and each layer's LR
scale (a multiplier of its groups' scheduled lr) is, from the metric normalised to [0, 1]
across layers (:mod:`adaptopt.scores.svd`, :mod:`.entropy`, :mod:`.cosine`):

.. math::
    \text{svd: } 1-\alpha M_{\text{SVD}},\qquad \text{ce: } 1-\beta M_{\text{CE}},\qquad
    \text{cs: } 1-\gamma\,(1-M_{\text{CS}})

each clamped to ``[max(1 − coefficient, floor), 1]``: lower metric → higher LR (higher CS
→ higher LR), never above the base LR, never 0.

The source contradicts itself: its phase formulas (``1 − α(1 − M)`` for SVD/CE, ``1 + γM``
for CS) give the *higher* LR to the higher metric and can exceed the base LR, while its
prose and code say "lower metric → higher LR" (``scale = 1 − metric``, ``scale = metric``
for CS). We follow the prose and code, bounded as above.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

from .base import LayerDecision, LayerView, Policy, Scores, build_policy, register_policy, require_epochs

PHASES = ("svd", "ce", "cs")


@register_policy
class LayerwiseLR(Policy):
    """Per-layer LR scales recomputed at each epoch start, cycling ``phases``.

    Args:
        phases: metrics in the order the epochs use them (default ``("svd", "ce", "cs")``).
        alpha, beta, gamma: strengths of the SVD, CE and CS phases (the source: 1).
        floor: smallest scale any layer gets (default 0.1: with coefficient 1 the formula
            would give some layer lr 0).
        base: the mode policy underneath (name, mapping or Policy). Default ``"full"``: all
            layers FULL. Any mode policy composes (``"lora"``, AutoMode, Spectrum, ...): its
            modes and ranks, these LR scales.
    """

    method = "layerwise_lr"

    def __init__(self, phases: Any = PHASES, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 floor: float = 0.1, base: Any = "full") -> None:
        phases = (phases,) if isinstance(phases, str) else tuple(phases)
        bad = [p for p in phases if p not in PHASES]
        if not phases or bad:
            raise ValueError(f"phases must be a non-empty sequence of {PHASES}, got {phases!r}")
        self.phases = phases
        for label, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not 0 <= value <= 1:
                raise ValueError(f"{label} must be in [0, 1] (it is the largest LR cut), got {value!r}")
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {floor!r}")
        self.alpha, self.beta, self.gamma, self.floor = float(alpha), float(beta), float(gamma), float(floor)
        self.base = build_policy(base)
        if isinstance(self.base, LayerwiseLR):
            raise ValueError("LayerwiseLR cannot be its own base: give a mode policy (full, lora, automode, ...)")
        self.quantize = self.base.quantize

    # ------------------------------------------------------------ the formula
    def phase_at(self, step: int, steps_per_epoch: int | None) -> str:
        epoch = 0 if step == 0 else step // require_epochs(self, steps_per_epoch)
        return self.phases[epoch % len(self.phases)]

    def scales(self, phase: str, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, float]:
        """LR scale per layer for ``phase``; all 1.0 (with a warning already issued by the
        scores) if the metric could not be normalised because every layer had the same value."""
        if any(phase not in scores.get(name, {}) for name in layers):
            warnings.warn(f"LayerwiseLR: no normalised {phase!r} metric for every layer; LR scales set to 1 "
                          "for this phase", RuntimeWarning, stacklevel=2)
            return dict.fromkeys(layers, 1.0)
        coefficient = {"svd": self.alpha, "ce": self.beta, "cs": self.gamma}[phase]
        low = max(1 - coefficient, self.floor)
        out = {}
        for name in layers:
            metric = scores[name][phase]
            raw = 1 - coefficient * (1 - metric) if phase == "cs" else 1 - coefficient * metric
            out[name] = min(max(raw, low), 1.0)
        return out

    # ------------------------------------------------------------ the protocol
    def needs_epochs(self) -> bool:
        return True

    def trainable_extra(self) -> tuple[str, ...]:
        return self.base.trainable_extra()

    def _epoch_start(self, step: int, steps_per_epoch: int | None) -> bool:
        return step == 0 or (steps_per_epoch is not None and step % steps_per_epoch == 0)

    def weight_scores(self, step: int, steps_per_epoch: int | None) -> tuple[str, ...]:
        own = (self.phase_at(step, steps_per_epoch),) if self._epoch_start(step, steps_per_epoch) else ()
        return tuple(dict.fromkeys(self.base.weight_scores(step, steps_per_epoch) + own))

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        return self.base.wants_stats(step, steps_per_epoch)

    def statistics(self):  # noqa: ANN201  (the base policy's Statistics)
        return self.base.statistics()

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return (self.base.is_decision_step(step, steps_per_epoch)
                or step % require_epochs(self, steps_per_epoch) == 0)

    def _combine(self, modes: Mapping[str, LayerDecision], layers: Mapping[str, LayerView],
                 scales: Mapping[str, float] | None) -> dict[str, LayerDecision]:
        out = dict(modes)
        if scales is not None:
            for name, view in layers.items():
                d = modes.get(name)
                out[name] = LayerDecision(d.mode if d else view.mode, d.rank if d else None, scales[name])
        return out

    def peak_assignment(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        return self.base.peak_assignment(layers)  # LR scales move no memory

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return self._combine(self.base.initial(layers, scores), layers,
                             self.scales(self.phases[0], layers, scores))

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        modes = (self.base.decide(layers, scores, step, steps_per_epoch)
                 if self.base.is_decision_step(step, steps_per_epoch) else {})
        scales = (self.scales(self.phase_at(step, steps_per_epoch), layers, scores)
                  if step % require_epochs(self, steps_per_epoch) == 0 else None)
        return self._combine(modes, layers, scales)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "phases": list(self.phases), "alpha": self.alpha, "beta": self.beta,
                "gamma": self.gamma, "floor": self.floor, "base": self.base.config()}


