"""Policies: pure functions from layer scores and current states to target states.

A policy never touches the model. :class:`~adaptopt.AdaptiveOptimizer` asks it

- ``initial(layers)`` once, for the assignment to start from;
- ``wants_stats(step, steps_per_epoch)`` before each step, to arm the statistics hooks
  only on the steps it needs (hooks cost nothing otherwise);
- ``is_decision_step(step, steps_per_epoch)`` after each update, and if so
  ``decide(layers, scores, step)``, whose result the optimizer applies as transitions.

``decide`` returns a :class:`LayerDecision` per layer it wants to change; layers it
leaves out keep their state. Every policy can be built from a mapping with
:func:`build_policy` (``{"method": "lora", "rank": 16}``), unknown keys rejected by name.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from .modes import Mode


@dataclass(frozen=True)
class LayerDecision:
    """What a layer should become: a mode, optionally a rank and an LR scale (``None`` = keep)."""

    mode: Mode
    rank: int | None = None
    lr_scale: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.coerce(self.mode))
        if self.lr_scale is not None and not self.lr_scale >= 0:
            raise ValueError(f"lr_scale must be ≥ 0, got {self.lr_scale!r}")


@dataclass(frozen=True)
class LayerView:
    """What a policy may read about one target layer."""

    name: str
    block_name: str | None
    block_index: int | None
    layer_type: str
    mode: Mode
    rank: int
    lr_scale: float
    in_features: int
    out_features: int
    quantized: bool


Scores = Mapping[str, Mapping[str, float]]


class Policy:
    """Base class with the defaults of a static policy: one initial assignment, no decisions,
    no statistics. Subclasses override what they need."""

    method: ClassVar[str] = ""

    def initial(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        return {}

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        return False

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return False

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int) -> dict[str, LayerDecision]:
        return {}

    def trainable_extra(self) -> tuple[str, ...]:
        """Name patterns of non-target parameters this policy trains (e.g. BitFit's biases)."""
        return ()

    def config(self) -> dict[str, Any]:
        """The mapping :func:`build_policy` rebuilds this policy from."""
        params = inspect.signature(type(self).__init__).parameters
        return {"method": self.method, **{name: getattr(self, name) for name in params if name != "self"}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({args})"


class Uniform(Policy):
    """Every target layer in one mode, from the start, forever."""

    mode: ClassVar[Mode]

    def __init__(self, rank: int | None = None) -> None:
        self.rank = rank

    def initial(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        return {name: LayerDecision(self.mode, self.rank) for name in layers}


class Full(Uniform):
    """Full fine-tuning of every target layer (and, through blocks, their norms and biases)."""

    method = "full"
    mode = Mode.FULL


class LoRA(Uniform):
    """LoRA on every target layer at ``rank`` (``None``: the optimizer's ``rank``)."""

    method = "lora"
    mode = Mode.LORA


class Frozen(Uniform):
    """Every target layer frozen (only non-target parameters such as heads train)."""

    method = "frozen"
    mode = Mode.FROZEN


def _name_matcher(pattern: str) -> Callable[[str], bool]:
    regex = re.compile(pattern)

    def matches(name: str) -> bool:
        parts = name.split(".")
        return any(regex.fullmatch(".".join(parts[i:j])) for i in range(len(parts))
                   for j in range(i + 1, len(parts) + 1))
    return matches


def name_matches(pattern: str, name: str) -> bool:
    """True if the regex ``pattern`` fullmatches a run of ``name``'s dotted components
    (``"classifier"`` matches ``classifier.dense.weight``; ``"bias"`` matches ``…LayerNorm.bias``)."""
    return _name_matcher(pattern)(name)


@dataclass
class Fixed(Policy):
    """A fixed per-layer assignment: ``{pattern: mode | (mode, rank) | LayerDecision}``.

    Patterns are regexes matched like :func:`name_matches`; the first matching entry wins,
    and layers no entry matches get ``default``.
    """

    assignment: Mapping[str, Any] = field(default_factory=dict)
    default: Mode | str = Mode.FROZEN
    method: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        self._rules = [(_name_matcher(p), self._decision(v)) for p, v in self.assignment.items()]
        self._default = self._decision(self.default)

    @staticmethod
    def _decision(value: Any) -> LayerDecision:
        if isinstance(value, LayerDecision):
            return value
        if isinstance(value, (tuple, list)):
            return LayerDecision(*value)
        return LayerDecision(Mode.coerce(value))

    def initial(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        return {name: next((d for matches, d in self._rules if matches(name)), self._default) for name in layers}

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "assignment": dict(self.assignment), "default": self.default}


POLICIES: dict[str, type[Policy]] = {cls.method: cls for cls in (Full, LoRA, Frozen, Fixed)}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Make ``cls`` buildable by its ``method`` name (a class decorator)."""
    POLICIES[cls.method] = cls
    return cls


def build_policy(spec: "Policy | str | Mapping[str, Any]") -> Policy:
    """A policy from an instance, a method name (``"lora"``) or a mapping
    (``{"method": "lora", "rank": 16}``). Unknown methods and keys are rejected by name."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"policy must be a Policy, a method name or a mapping, got {type(spec).__name__}")
    options = dict(spec)
    method = str(options.pop("method", "")).lower()
    if method not in POLICIES:
        raise ValueError(f"unknown policy method {method!r}: choose one of {sorted(POLICIES)}")
    cls = POLICIES[method]
    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n in params if n != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for policy {method!r}: accepted are {accepted}")
    return cls(**options)
