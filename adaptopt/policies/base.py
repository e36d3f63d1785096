"""The policy protocol: pure functions from layer scores and current states to target states.

A policy never touches the model. :class:`~adaptopt.AdaptiveOptimizer` asks it

- ``weight_scores(0, steps_per_epoch)`` and then ``initial(layers, scores)`` once, for the
  assignment to start from (with the weight-only score families it asked for computed);
- ``wants_stats(step, steps_per_epoch)`` before each step, to arm the statistics hooks
  (gradient importance, activation magnitudes) only on the steps it needs;
- ``is_decision_step(step, steps_per_epoch)`` after each update, and if so computes the
  families of ``weight_scores(step, steps_per_epoch)`` and calls
  ``decide(layers, scores, step, steps_per_epoch)``, whose result it applies as transitions.

``initial`` / ``decide`` return a :class:`LayerDecision` per layer to change; layers left out
keep their state. ``step`` counts completed optimizer steps (the first decision can come
after step 1). Every policy can be built from a mapping with :func:`build_policy`
(``{"method": "automode", "u": 6, "t": 10}``), unknown methods and keys rejected by name.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

from ..modes import Mode
from ..name_patterns import matcher as name_matcher  # noqa: F401  (re-exported: policies match names with it)
from ..name_patterns import name_matches as name_matches
from ..peft_arguments import accepts_peft_names, with_our_names


@dataclass(frozen=True)
class LayerDecision:
    """What a layer should become: a mode, optionally a rank and an LR scale (``None`` = keep)."""

    mode: Mode
    rank: int | None = None
    lr_scale: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.coerce(self.mode))
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"LayerDecision rank must be a positive int or None (keep the layer's rank), "
                             f"got {self.rank!r}")
        if self.lr_scale is not None and (isinstance(self.lr_scale, bool) or not isinstance(self.lr_scale, (int, float))
                                          or not math.isfinite(self.lr_scale) or self.lr_scale < 0):
            raise ValueError(f"lr_scale must be a finite number ≥ 0, got {self.lr_scale!r}")


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


SCORES = ("cheap", "probed", "exact")  # gradient scores a policy may ask for (see Statistics)


class Statistics(NamedTuple):
    """What the statistics hooks collect for a policy (:class:`adaptopt.training.layer_stats.StatsCollector`).

    - ``gradient``: ``"exact"`` (``‖δᵀx‖_F``), ``"cheap"`` (estimated from the step's own
      gradients, :mod:`adaptopt.training.gradient_probes`), ``"probed"`` (cheap, LoRA layers also
      probed) or ``None``;
    - ``activations``: sum the layers' input statistics (``act_rms``, ``act_mean_abs``);
    - ``frozen_layers``: score FROZEN layers too. ``False`` leaves them unhooked, so a frozen
      prefix of the network gets no backward pass at all.
    """

    gradient: str | None = "exact"
    activations: bool = True
    frozen_layers: bool = True


class OverBudget(ValueError):
    """An assignment (or LoRA itself) needs more memory than the budget allows; the message names
    both figures. A ``ValueError``, so callers that catch those keep working."""


class Budget(NamedTuple):
    """Bytes a run may spend on training memory, and what an assignment costs (docs/optimizer.md,
    "Memory budgets"). Pure for the policy: ``cost`` maps every layer's ``(mode, rank)`` to the
    peak bytes of the run in that assignment; the optimizer builds it from the model
    (:mod:`adaptopt.training.budget`), tests from made-up sizes."""

    limit: int
    cost: Callable[[Mapping[str, tuple[Mode, int]]], int]

    def cost_of(self, layers: Mapping[str, LayerView], decisions: Mapping[str, LayerDecision]) -> int:
        """The cost of ``layers`` after ``decisions`` (layers left out keep their mode and rank)."""
        modes = {}
        for name, view in layers.items():
            d = decisions.get(name)
            modes[name] = (view.mode, view.rank) if d is None else (d.mode, d.rank or view.rank)
        return self.cost(modes)

    def fits(self, layers: Mapping[str, LayerView], decisions: Mapping[str, LayerDecision]) -> bool:
        return self.cost_of(layers, decisions) <= self.limit


def spend_on_full(ranked: Sequence[str], count: int, groups: Mapping[str, Sequence[str]],
                  layers: Mapping[str, LayerView], rest: Callable[[str], LayerDecision],
                  budget: Budget | None) -> list[str]:
    """The units of ``ranked`` (most important first) that train fully. Without a budget: the
    first ``count``. With one, ``count`` is ignored and the budget is spent: each unit in turn
    joins if the assignment (the chosen units FULL, every other unit ``rest(unit)``) still fits,
    a unit that does not fit is skipped and the next one tried — so no unit left out could be
    added within the budget."""
    if budget is None:
        return list(ranked[:count])
    chosen: list[str] = []
    for unit in ranked:
        trial = set(chosen) | {unit}
        decisions = {name: LayerDecision(Mode.FULL) if u in trial else rest(u)
                     for u, names in groups.items() for name in names}
        if budget.fits(layers, decisions):
            chosen.append(unit)
    return chosen


class Policy:
    """Base class with the defaults of a static policy: one initial assignment, no decisions,
    no statistics. Subclasses override what they need.

    ``quantize`` (``None``, ``"nf4"``, a :class:`~adaptopt.QuantConfig`, ...) is the 4-bit
    base the policy wants when the optimizer injects the adapters (QLoRA, ALoRS); an
    explicit ``AdaptiveOptimizer(quantize=...)`` wins.
    """

    method: ClassVar[str] = ""
    quantize: Any = None
    # the run's length in optimizer steps, fixed by the optimizer when it is first known
    # (AdaptiveOptimizer(total_steps=), set_total_steps) and kept in its state_dict, so a resumed run
    # keeps every step placed by it; not part of config(): it belongs to the run, not to the settings
    run_steps: int | None = None
    # the run's memory budget (AdaptiveOptimizer(memory_budget=)), set by the optimizer like run_steps;
    # a policy that spends it (spends_budget) chooses its FULL units with spend_on_full
    memory_budget: Budget | None = None
    spends_budget: ClassVar[bool] = False
    # whether this run's first decision was made before training, from a scoring pass
    # (AdaptiveOptimizer.score_before_training), set and kept by the optimizer like run_steps
    scored_before_training: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every policy's constructor takes PEFT's names too (``LoRA(r=16)``; :mod:`adaptopt.peft_arguments`)."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = accepts_peft_names(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def initial(self, layers: Mapping[str, LayerView], scores: Scores) -> dict[str, LayerDecision]:
        return {}

    def weight_scores(self, step: int, steps_per_epoch: int | None) -> tuple[str, ...]:
        """Weight-only score families (:data:`adaptopt.scores.WEIGHT_FAMILIES`) needed at ``step``
        (0 = before ``initial``)."""
        return ()

    def wants_stats(self, step: int, steps_per_epoch: int | None) -> bool:
        return False

    def statistics(self) -> "Statistics":
        """What the armed hooks collect (:class:`Statistics`)."""
        return Statistics()

    def is_decision_step(self, step: int, steps_per_epoch: int | None) -> bool:
        return False

    def decide(self, layers: Mapping[str, LayerView], scores: Scores, step: int,
               steps_per_epoch: int | None) -> dict[str, LayerDecision]:
        return {}

    def peak_assignment(self, layers: Mapping[str, LayerView]) -> dict[str, LayerDecision]:
        """The assignment under which this policy trains the most (for memory estimates): its initial
        one, with every score a layer's size, so a policy that ranks by a score ranks the largest
        first. Policies that decide later override it with their largest decision."""
        return self.initial(layers, size_scores(layers))

    def run_phases(self, layers: Mapping[str, LayerView], run_steps: int) -> list[tuple[int, dict[str, LayerDecision]]]:
        """The assignments a run of ``run_steps`` steps trains under, in order, each with its number
        of steps, every score a layer's size (for the compute estimate, training/compute.py). This
        default — the peak assignment all run — is exact for a static policy and an upper bound for
        one whose later decisions follow scores no estimate can know (AutoMode's)."""
        return [(run_steps, self.peak_assignment(layers))]

    def decides_before_training(self) -> bool:
        """True if the policy's first decision reads one batch's gradients and may be made from a
        scoring pass before the first update (:meth:`AdaptiveOptimizer.score_before_training`); it then
        reads :attr:`scored_before_training` to skip the decision it would make after that step."""
        return False

    def placed_by_run_length(self) -> dict[str, int]:
        """The steps this policy placed by the run's length (``run_steps``), named for a person
        (``{"the prefix freezes after step": 120}``); empty when nothing depends on it. The optimizer
        fixes ``run_steps`` when the run's length is first known and keeps it on resume."""
        return {}

    def needs_epochs(self) -> bool:
        """True if the policy counts in epochs, so the optimizer needs ``steps_per_epoch``."""
        return False

    # whether, unless AdaptiveOptimizer(train_embeddings=) says otherwise, the output layer gets an adapter
    # that trains all run outside the policy's decisions (adaptopt/surgery/output_adapter.py)
    adapts_output_layer = False

    def trainable_extra(self) -> tuple[str, ...]:
        """Name patterns of non-target parameters this policy trains (e.g. BitFit's biases)."""
        return ()

    def config(self) -> dict[str, Any]:
        """The mapping :func:`build_policy` rebuilds this policy from."""
        params = inspect.signature(type(self).__init__).parameters.values()
        return {"method": self.method, **{p.name: getattr(self, p.name) for p in params if p.name != "self"
                                          and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({args})"


SIZE_KEYS = ("grad_norm", "snr", "snr_compat", "signal_fraction", "signal_fraction_compat", "weight_norm", "act_rms")


def size_scores(layers: Mapping[str, LayerView]) -> dict[str, dict[str, float]]:
    """Every score of every layer set to its size (``in × out``): what a worst-case estimate ranks by."""
    return {name: dict.fromkeys(SIZE_KEYS, float(v.in_features * v.out_features)) for name, v in layers.items()}


def percent_count(percent: float, n: int) -> int:
    """How many of ``n`` items are "the top ``percent`` %": ``⌈n·p/100⌉`` (at least one item for
    any ``p > 0``, so ``t=10`` over 6 blocks promotes one block, not none)."""
    return min(n, math.ceil(n * percent / 100 - 1e-9)) if percent > 0 else 0


def check_percent(label: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"{label} is a percentage in [0, 100], got {value!r}")
    return float(value)


def units_in_mode(groups: Mapping[str, Any], layers: Mapping[str, LayerView], mode: Mode) -> list[str]:
    """The units of ``groups`` (unit → its layer names) whose layers are all in ``mode``, in order."""
    return [unit for unit, names in groups.items() if all(layers[n].mode is mode for n in names)]


def check_positive_int(label: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def position_in_epoch(step: int, steps_per_epoch: int) -> int:
    """``1 … steps_per_epoch``: where completed step ``step`` (1-based) falls in its epoch."""
    return (step - 1) % steps_per_epoch + 1


def evenly_spaced(steps_per_epoch: int, per_epoch: int) -> frozenset[int]:
    """Positions within an epoch of ``per_epoch`` evenly spaced events, the last at the epoch's
    end: ``⌊k·E/u⌋`` for ``k = 1 … u`` (every step when ``u ≥ E``)."""
    return frozenset(max(1, k * steps_per_epoch // per_epoch) for k in range(1, per_epoch + 1))


def require_epochs(policy: "Policy", steps_per_epoch: int | None) -> int:
    if steps_per_epoch is None:
        raise ValueError(f"policy {policy.method!r} counts in epochs: pass steps_per_epoch= to AdaptiveOptimizer "
                         "(len(train_dataloader) // gradient_accumulation_steps), or use the HF Trainer callback")
    return steps_per_epoch


POLICIES: dict[str, type[Policy]] = {}
# The one default: AdaptiveOptimizer(model) without a policy, a CLI config without fine_tuning, and what
# the README calls the default (docs/policies.md, "The default", says why this one)
DEFAULT_POLICY = "hybrid"


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Make ``cls`` buildable by its ``method`` name (a class decorator)."""
    POLICIES[cls.method] = cls
    return cls


def build_policy(spec: "Policy | str | Mapping[str, Any]") -> Policy:
    """A policy from an instance, a method name (``"lora"``) or a mapping
    (``{"method": "lora", "rank": 16}``). Unknown methods and keys are rejected by name."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, type) and issubclass(spec, Policy):
        return spec()
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
    options = with_our_names(options, accepted, f"policy {method!r}")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for policy {method!r}: accepted are {accepted}")
    return cls(**options)
