"""Static policies: one assignment at the start, no decisions, no statistics.

The baselines (docs/design.md §7): ``Full``, ``LoRA(r)``, ``QLoRA(r)`` (the methods framework),
``BitFit`` and ``TopK(k)`` (AutoMode's baselines), plus ``Frozen``, a hand-written ``Fixed`` assignment
and a ``Scheduled`` plan of assignments by step (a policy's static twin).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ..modes import Mode
from .base import LayerDecision, LayerView, Policy, Scores, check_positive_int, name_matcher, register_policy


class Uniform(Policy):
    """Every target layer in one mode, from the start, forever."""

    mode: ClassVar[Mode]

    def __init__(self, rank: int | None = None) -> None:
        self.rank = check_positive_int("rank", rank, allow_none=True)

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return {name: LayerDecision(self.mode, self.rank) for name in layers}


@register_policy
class Full(Uniform):
    """Full fine-tuning: every target layer FULL, and every other parameter of the model
    trains too (embeddings, norms, heads), as ``AdamW(model.parameters())`` would train it.
    The optimizer's ``frozen=`` patterns still exclude parameters."""

    method = "full"
    mode = Mode.FULL

    def trainable_extra(self) -> tuple[str, ...]:
        return (".*",)


@register_policy
class LoRA(Uniform):
    """LoRA on every target layer at ``rank`` (``None``: the optimizer's ``rank``)."""

    method = "lora"
    mode = Mode.LORA


@register_policy
class Frozen(Uniform):
    """Every target layer frozen (only non-target parameters such as heads train)."""

    method = "frozen"
    mode = Mode.FROZEN


@register_policy
class QLoRA(LoRA):
    """LoRA at ``rank`` over a 4-bit base: the optimizer quantizes the targets with ``quantize``
    (``"nf4"`` default, ``"fp4"``, or a :class:`~adaptopt.QuantConfig` mapping) when it injects."""

    method = "qlora"

    def __init__(self, rank: int | None = None, quantize: Any = "nf4") -> None:
        super().__init__(rank)
        self.quantize = quantize


@register_policy
class BitFit(Frozen):
    """BitFit (Ben Zaken et al., 2022): every weight frozen; all biases and the task head train."""

    method = "bitfit"

    def __init__(self) -> None:
        super().__init__(None)

    def trainable_extra(self) -> tuple[str, ...]:
        return ("bias",)


@register_policy
class TopK(Policy):
    """The last ``k`` transformer blocks FULL (all their parameters), every other block ``rest``:
    frozen (AutoMode's baseline, the default) or LoRA (``rest="lora"``: LoRA with the top ``k``
    blocks trained fully)."""

    method = "topk"

    def __init__(self, k: int = 1, rest: str = "frozen") -> None:
        self.k = check_positive_int("k", k)
        if rest not in ("frozen", "lora"):
            raise ValueError(f"rest must be 'frozen' or 'lora', got {rest!r}")
        self.rest = rest

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        blocks = sorted({v.block_index for v in layers.values() if v.block_index is not None})
        if not blocks:
            raise ValueError("TopK needs target layers inside numbered blocks (e.g. 'encoder.layer.3.…'); "
                             "this model's targets have no block index")
        top = set(blocks[-self.k:])
        return {name: LayerDecision(Mode.FULL if v.block_index in top else Mode.coerce(self.rest))
                for name, v in layers.items()}


@register_policy
class Scheduled(Policy):
    """A fixed plan of assignments by step: ``{0: {layer: mode, ...}, 120: {layer: "frozen"}}``,
    exact layer names; step 0 is the initial assignment, a later step ``s`` applies after ``s``
    completed optimizer steps. What a policy's *static twin* runs: the assignment an adaptive run
    reached, from step 0, with the same late freezes (``adaptopt suite``, docs/cli.md)."""

    method = "scheduled"

    def __init__(self, plan: Mapping[Any, Mapping[str, Any]] | None = None) -> None:
        plan = plan or {}
        self.plan: dict[int, dict[str, Mode]] = {}
        for step, assignment in plan.items():
            try:
                at = int(step)
            except (TypeError, ValueError):
                raise ValueError(f"Scheduled: plan steps are optimizer steps (ints ≥ 0), got {step!r}") from None
            if at < 0 or not isinstance(assignment, Mapping):
                raise ValueError(f"Scheduled: plan[{step!r}] must map layer names to modes, at a step ≥ 0")
            self.plan[at] = {str(name): Mode.coerce(mode) for name, mode in assignment.items()}

    def _decisions(self, layers: Mapping[str, LayerView], step: int) -> dict[str, LayerDecision]:
        unknown = sorted(set(self.plan.get(step, {})) - set(layers))
        if unknown:
            raise ValueError(f"Scheduled: plan[{step}] names layers this model does not have: {unknown[:5]}")
        return {name: LayerDecision(mode) for name, mode in self.plan.get(step, {}).items()}

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return self._decisions(layers, 0)

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return step > 0 and step in self.plan

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        return self._decisions(layers, step)

    def run_phases(self, layers: Mapping[str, LayerView], run_steps: int) -> list[tuple[int, dict[str, LayerDecision]]]:
        """Each planned assignment until the next planned step, what earlier steps set carried over
        (a layer no step has named stays as the optimizer injects it: LoRA)."""
        starts = sorted({0} | {s for s in self.plan if s < run_steps})
        current: dict[str, LayerDecision] = {}
        phases = []
        for at, end in zip(starts, starts[1:] + [run_steps]):
            current = current | self._decisions(layers, at)
            phases.append((end - at, dict(current)))
        return phases

    def config(self) -> dict[str, Any]:
        return {"method": self.method,
                "plan": {str(step): {n: m.value for n, m in a.items()} for step, a in sorted(self.plan.items())}}


@register_policy
@dataclass
class Fixed(Policy):
    """A fixed per-layer assignment: ``{pattern: mode | (mode, rank) | LayerDecision}``.

    Patterns are regexes matched like :func:`~adaptopt.policies.name_matches`; the first
    matching entry wins, and layers no entry matches get ``default``.
    """

    assignment: Mapping[str, Any] = field(default_factory=dict)
    default: Mode | str = Mode.FROZEN
    method: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        self._rules = [(name_matcher(p), self._decision(v)) for p, v in self.assignment.items()]
        self._default = self._decision(self.default)

    @staticmethod
    def _decision(value: Any) -> LayerDecision:
        if isinstance(value, LayerDecision):
            return value
        if isinstance(value, (tuple, list)):
            return LayerDecision(*value)
        return LayerDecision(Mode.coerce(value))

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return {name: next((d for matches, d in self._rules if matches(name)), self._default) for name in layers}

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "assignment": dict(self.assignment), "default": self.default}
