"""``AdaptiveOptimizer``: AdamW that owns a per-layer state machine (frozen / LoRA r / full).

In a raw loop ``loss.backward(); opt.step(); opt.zero_grad()`` does everything: after each
update the policy may decide, and the chosen layers change mode in place (function-
preserving, :meth:`adaptopt.LoRALinear.set_mode`), with only their own optimizer state
touched.

Param groups never change in number: group 0 holds the non-target parameters that train
("other"); every target layer has a "full" group (its weight / dense delta and bias,
lr = ``lr``) and a "lora" group (its factors, lr = ``lora_lr``), either possibly empty. A
scheduler built once at the start therefore schedules every layer, including layers
promoted later. A layer's LR scale multiplies its groups' scheduled lr during the update:

.. math::  \\mathrm{lr}_{\\text{effective}}(\\ell) = \\mathrm{lr}_{\\text{scheduled}}(\\text{group}) \\cdot \\mathrm{scale}_\\ell
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .changes import mark_changed
from .distributed import active_group, all_reduce_stats, broadcast_decisions
from .hooks import StatsCollector
from .inject import Targets, find_adapters, inject_adapters
from .lora import LoRALinear
from .modes import Mode
from .policies import LayerDecision, LayerView, Policy, build_policy, name_matches
from .quant import QuantLoRALinear
from .scores import FAMILY_KEYS, weight_scores

TASK_HEADS = ("classifier", "score")
LORA_LR_MULTIPLE = 10.0
STATE_FORMAT = "adaptopt.AdaptiveOptimizer/1"
NONFINITE = ("skip", "raise", "ignore")


def _from_families(key: str, families: Iterable[str]) -> bool:
    """Does score ``key`` (e.g. ``"svd_raw"``, ``"signal_fraction_compat"``) belong to one of ``families``?"""
    return any(key in FAMILY_KEYS[f] for f in families)


def _plain(value: Any) -> Any:
    """``value`` with enums, dataclasses and tuples turned into str / dict / list (safe to torch.load)."""
    from dataclasses import asdict, is_dataclass
    if isinstance(value, Mode):
        return value.value
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class AdaptiveOptimizer(torch.optim.Optimizer):
    """AdamW over a model whose target layers a policy moves between FROZEN, LORA and FULL.

    Args:
        model: any ``nn.Module``. Adapters are injected (``targets``, ``rank``, ``alpha``,
            ``dropout``, ``rslora``, ``quantize``) unless the model already has some.
        lr: learning rate of full weights and non-target parameters.
        policy: a :class:`~adaptopt.policies.Policy`, a method name (``"lora"``) or a mapping
            (``{"method": "lora", "rank": 16}``).
        lora_lr: learning rate of adapter factors; default ``10 × lr`` (measured: LoRA at the
            full-fine-tuning LR learns nothing on MiniLM / Rotten Tomatoes, DESIGN 3.2).
        train_other: whether non-target parameters (embeddings, norms, biases outside FULL
            blocks) train. Task heads train regardless (see ``trainable``).
        trainable: name patterns (regex over dotted name runs) of non-target parameters that
            always train; default the task heads ``classifier`` and ``score``.
        frozen: name patterns that never train (wins over everything but FULL targets).
        steps_per_epoch: epoch length for policies that decide "u times per epoch" (the HF
            callback sets it for you).
        nonfinite: what a step with NaN/inf gradients does: ``"skip"`` (default: no update, no
            decision, ``skipped_steps += 1``), ``"raise"`` (``FloatingPointError``) or
            ``"ignore"`` (no check, no host sync).
        process_group: under ``torch.distributed``, the ranks that must agree (default: the
            world when it is initialized). Scores are summed over them and rank 0's decisions
            applied everywhere (:mod:`adaptopt.distributed`).
        **adamw_kwargs: passed to ``torch.optim.AdamW`` (``betas``, ``eps``, ``weight_decay``,
            ``foreach`` defaults to True, ...).

    A block whose targets are all FULL also trains its other parameters (norms, biases).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, policy: Policy | str | Mapping[str, Any] = "lora", *,
                 lora_lr: float | None = None, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 rslora: bool = False, targets: Targets = "auto", quantize: Any = None, train_other: bool = False,
                 trainable: Iterable[str] = TASK_HEADS, frozen: Iterable[str] = (),
                 steps_per_epoch: int | None = None, nonfinite: str = "skip", process_group: Any = None,
                 **adamw_kwargs: Any) -> None:
        lora_lr = lr * LORA_LR_MULTIPLE if lora_lr is None else lora_lr
        for label, value in (("lr", lr), ("lora_lr", lora_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{label} must be a finite number ≥ 0, got {value!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0):
            raise ValueError(f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}")
        adamw_kwargs.setdefault("foreach", True)
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr, **adamw_kwargs)  # validates betas, eps, ...
        self.policy = build_policy(policy)

        self.model = model
        self.layers: dict[str, LoRALinear] = find_adapters(model) or inject_adapters(
            model, targets, rank, alpha, dropout=dropout, rslora=rslora,
            quantize=quantize if quantize is not None else self.policy.quantize)
        self.lr, self.lora_lr = float(lr), float(lora_lr)
        self.train_other = bool(train_other)
        self.trainable_patterns = tuple(trainable) + tuple(self.policy.trainable_extra())
        self.frozen_patterns = tuple(frozen)
        self.steps_per_epoch = steps_per_epoch
        self.nonfinite = nonfinite
        self.step_count = 0
        self.skipped_steps = 0
        self.lr_scales = {name: 1.0 for name in self.layers}
        self.scores: dict[str, dict[str, float]] = {name: {} for name in self.layers}
        self.history: list[dict[str, Any]] = []
        self.score_log: list[dict[str, Any]] = []
        self.last_check: dict[str, Any] = {}
        self.process_group = process_group
        self._transition_hooks: OrderedDict[int, Callable[["AdaptiveOptimizer"], None]] = OrderedDict()

        self._roles: list[tuple[str, str | None]] = [("other", None)]
        groups: list[dict[str, Any]] = [{"params": [], "lr": self.lr}]
        for name in self.layers:
            self._roles += [("full", name), ("lora", name)]
            groups += [{"params": [], "lr": self.lr}, {"params": [], "lr": self.lora_lr}]
        self._group_of_role = {role: i for i, role in enumerate(self._roles)}
        defaults = {"lr": self.lr, **adamw_kwargs}
        super().__init__(groups, defaults)
        self.inner = torch.optim.AdamW(self.param_groups, **{"lr": self.lr, **adamw_kwargs})
        self.param_groups = self.inner.param_groups  # one list: schedulers and AdamW see the same groups
        self.state = self.inner.state
        self.defaults = self.inner.defaults  # betas etc., which OneCycleLR looks for

        self.collector = StatsCollector(self.layers)
        self._refresh_weight_scores(0)
        self._apply(self._agreed(self.policy.initial(self.views(), self.scores)), reason="initial")
        self._arm_for(1)

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Tell epoch-counting policies the epoch length (optimizer steps per epoch); the HF
        callback calls this at the start of training."""
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        self.steps_per_epoch = steps_per_epoch
        self._arm_for(self.step_count + 1)

    # ------------------------------------------------------------------ views
    def views(self) -> dict[str, LayerView]:
        """What a policy sees of each layer."""
        views = {}
        for name, m in self.layers.items():
            t = m.target
            views[name] = LayerView(name, t.block_name if t else None, t.block_index if t else None,
                                    t.layer_type if t else name, m.mode, m.rank, self.lr_scales[name],
                                    m.in_features, m.out_features, isinstance(m, QuantLoRALinear))
        return views

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])).all())

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One AdamW update with per-layer LR scales, then the policy's decision if due.

        With ``nonfinite="skip"`` a step whose gradients hold NaN/inf changes no weight and
        triggers no transition; it only counts ``skipped_steps``.
        """
        if self.steps_per_epoch is None and self.policy.needs_epochs():
            raise ValueError(f"policy {self.policy.method!r} counts in epochs: pass steps_per_epoch= to "
                             "AdaptiveOptimizer (or set opt.steps_per_epoch; the HF Trainer callback does it); "
                             "nothing was updated")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "ignore" and not self._grads_finite():
            if self.nonfinite == "raise":
                bad = [self._name_of(p) for g in self.param_groups for p in g["params"]
                       if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                raise FloatingPointError(f"non-finite gradients in {bad[:8]}: lower the LR, clip gradients or "
                                         "use a GradScaler; nothing was updated")
            self.skipped_steps += 1
            return loss
        scaled = []
        for group, (_, layer) in zip(self.param_groups, self._roles):
            scale = self.lr_scales[layer] if layer is not None else 1.0
            if scale != 1.0:
                scaled.append((group, group["lr"]))
                group["lr"] = group["lr"] * scale
        try:
            self.inner.step()
        finally:
            for group, lr in scaled:
                group["lr"] = lr
        self.step_count += 1
        if self.policy.is_decision_step(self.step_count, self.steps_per_epoch):
            self.decide()
        self._arm_for(self.step_count + 1)
        return loss

    def decide(self) -> dict[str, LayerDecision]:
        """Ask the policy now (normally called by :meth:`step` at its decision points)."""
        group = active_group(self.process_group)
        if group is not None:
            all_reduce_stats(self.collector, group)
        collected = self.collector.scores() if any(s.count for s in self.collector.stats.values()) else {}
        for name, values in collected.items():
            self.scores[name].update(values)
        self._refresh_weight_scores(self.step_count)
        decisions = self.policy.decide(self.views(), self.scores, self.step_count, self.steps_per_epoch)
        self._apply(self._agreed(decisions), reason="decision")
        self.collector.reset()
        return decisions

    def _agreed(self, decisions: Mapping[str, LayerDecision]) -> Mapping[str, LayerDecision]:
        """Under ``torch.distributed``, rank 0's decisions (every rank must transition alike)."""
        group = active_group(self.process_group)
        return decisions if group is None else broadcast_decisions(decisions, list(self.layers), group)

    def _refresh_weight_scores(self, step: int) -> None:
        """Compute the weight-only score families the policy needs at ``step`` into ``scores``
        (replacing that family's previous values), and log every layer's scores."""
        families = self.policy.weight_scores(step, self.steps_per_epoch)
        if families:
            fresh = weight_scores(self.layers, families)
            for name, values in fresh.items():
                self.scores[name] = {k: v for k, v in self.scores[name].items() if not _from_families(k, families)}
                self.scores[name].update(values)
        if families or step > 0:
            self.score_log.append({"step": step, "scores": {k: dict(v) for k, v in self.scores.items()}})

    def _arm_for(self, step: int) -> None:
        if self.steps_per_epoch is None and self.policy.needs_epochs():
            self.collector.disarm()  # not known yet (the HF callback sets it at train start); step() insists
        elif self.policy.wants_stats(step, self.steps_per_epoch):
            self.collector.arm()
        else:
            self.collector.disarm()

    # ------------------------------------------------------------------ transitions
    def apply(self, decisions: Mapping[str, LayerDecision | Mode | str]) -> None:
        """Apply decisions by hand (``{"layer name": Mode.FULL}`` or :class:`LayerDecision`)."""
        self._apply({k: v if isinstance(v, LayerDecision) else LayerDecision(Mode.coerce(v))
                     for k, v in decisions.items()}, reason="manual")

    def _apply(self, decisions: Mapping[str, LayerDecision], reason: str) -> None:
        unknown = sorted(set(decisions) - set(self.layers))
        if unknown:
            raise ValueError(f"decisions name unknown layers {unknown[:8]}; layers are named as in opt.layers")
        changing = {name: d for name, d in decisions.items()
                    if (d.mode, d.rank or self.layers[name].rank) != (self.layers[name].mode, self.layers[name].rank)}
        for name, decision in changing.items():  # check every layer first: a failed decision changes nothing
            self.layers[name].check_transition(decision.mode, decision.rank)
        for name, decision in decisions.items():
            module = self.layers[name]
            before = (module.mode, module.rank, self.lr_scales[name])
            if name in changing:
                module.set_mode(decision.mode, decision.rank or module.rank)
            if decision.lr_scale is not None:
                self.lr_scales[name] = float(decision.lr_scale)
            after = (module.mode, module.rank, self.lr_scales[name])
            if after != before:
                self.history.append({"step": self.step_count, "layer": name, "reason": reason,
                                     "from_mode": before[0].value, "from_rank": before[1], "from_lr_scale": before[2],
                                     "mode": after[0].value, "rank": after[1], "lr_scale": after[2],
                                     "scores": dict(self.scores.get(name, {}))})
        if self._reconcile():
            self._run_transition_hooks()
        self.check_consistency()

    def register_transition_hook(self, hook: Callable[["AdaptiveOptimizer"], None]) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(optimizer)`` whenever the set of trained parameters changes (a transition,
        or :meth:`load_state_dict`), after the change. Wrappers that bind parameters when they
        are built (DDP) rebuild themselves here. Returns a handle whose ``remove()`` detaches it."""
        handle = torch.utils.hooks.RemovableHandle(self._transition_hooks)
        self._transition_hooks[handle.id] = hook
        return handle

    def _run_transition_hooks(self) -> None:
        for hook in list(self._transition_hooks.values()):
            hook(self)

    def _desired_groups(self) -> dict[nn.Parameter, int]:
        """Where every parameter that should train belongs, from the layers' modes and the rules."""
        desired: dict[nn.Parameter, int] = {}
        for name, module in self.layers.items():
            kind = "lora" if module.mode is Mode.LORA else "full"
            for _, p in module.mode_parameters():
                desired[p] = self._group_of_role[(kind, name)]
        full_blocks = self._full_blocks({name: m.mode for name, m in self.layers.items()})
        for pname, p in self._extra_candidates():
            if p not in desired and self._extra_trains(pname, full_blocks):
                desired[p] = 0
        return desired

    def _full_blocks(self, modes: Mapping[str, Mode]) -> set[str]:
        """Blocks whose target layers are all FULL: they train every parameter they hold."""
        full, partial = set(), set()
        for name, mode in modes.items():
            target = self.layers[name].target
            if target is not None and target.block_name is not None:
                (full if mode is Mode.FULL else partial).add(target.block_name)
        return full - partial

    def _extra_candidates(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters the rules (not a layer's mode) decide about: everything outside target
        layers, plus the targets' biases (BitFit trains them in any mode)."""
        owned = {p for m in self.layers.values() for p in m.parameters()}
        return [(name, p) for name, p in self.model.named_parameters()
                if p.is_floating_point() and (p not in owned or name.endswith(".bias"))]

    def _extra_trains(self, name: str, full_blocks: set[str]) -> bool:
        if any(name.startswith(block + ".") for block in full_blocks):
            return True
        if any(name_matches(pattern, name) for pattern in self.frozen_patterns):
            return False
        return self.train_other or any(name_matches(pattern, name) for pattern in self.trainable_patterns)

    def _reconcile(self) -> bool:
        """Make requires_grad, group membership and Adam state follow :meth:`_desired_groups`.

        Parameters that stay in training keep their state; parameters that leave get
        ``requires_grad=False``, ``grad=None`` and no state (AdamW would otherwise still
        move them on a zero gradient through its momentum). Returns whether the set of
        trained parameters (or their groups) changed.
        """
        before = [list(g["params"]) for g in self.param_groups]  # holds them, so ids stay unique
        desired = self._desired_groups()
        for index, group in enumerate(self.param_groups):
            kept = []
            for p in group["params"]:
                if desired.get(p) == index:
                    kept.append(p)
                    del desired[p]
                else:
                    self.inner.state.pop(p, None)
                    p.grad = None
            group["params"] = kept
        for p, index in desired.items():
            self.param_groups[index]["params"].append(p)
        in_groups = {p for g in self.param_groups for p in g["params"]}
        mark_changed(*in_groups)
        for p in self.model.parameters():
            if p.is_floating_point():
                p.requires_grad_(p in in_groups)
            if p not in in_groups:
                p.grad = None
        return [list(map(id, ps)) for ps in before] != [list(map(id, g["params"])) for g in self.param_groups]

    def _name_of(self, p: nn.Parameter) -> str:
        return next((n for n, q in self.model.named_parameters() if q is p), f"<unnamed {tuple(p.shape)}>")

    def check_consistency(self) -> dict[str, Any]:
        """Verify, and record in ``last_check``, that the trainable set, the optimizer's
        parameters and its state entries agree. Raises ``RuntimeError`` naming the parameters."""
        names = {p: n for n, p in self.model.named_parameters()}
        trainable = {p for p in names if p.requires_grad}
        listed = [p for g in self.param_groups for p in g["params"]]
        in_groups = set(listed)
        problems = []
        if len(listed) != len(in_groups):
            problems.append("parameters listed in two groups")
        for label, bad in (("trainable but not in the optimizer", trainable - in_groups),
                           ("in the optimizer but not trainable", in_groups - trainable),
                           ("with optimizer state but not in the optimizer", set(self.inner.state) - in_groups)):
            if bad:
                problems.append(f"{label}: {sorted(names.get(p, '<not in model>') for p in bad)[:8]}")
        if problems:
            raise RuntimeError("AdaptiveOptimizer consistency check failed at step "
                               f"{self.step_count}: " + "; ".join(problems))
        self.last_check = {"step": self.step_count, "trainable": len(trainable),
                           "trainable_elements": sum(p.numel() for p in trainable), "state_entries": len(self.inner.state)}
        return self.last_check

    # ------------------------------------------------------------------ reporting
    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    def summary(self) -> str:
        """A table of layers × mode / rank / LR scale / trainable parameters, with totals."""
        rows = [("layer", "mode", "rank", "lr scale", "trainable")]
        target_total = 0
        for name, module in self.layers.items():
            count = sum(p.numel() for _, p in module.mode_parameters())
            target_total += count
            rows.append((name, module.mode.value, str(module.rank) if module.mode is Mode.LORA else "-",
                         f"{self.lr_scales[name]:g}", f"{count:,}"))
        other = sum(p.numel() for p in self.param_groups[0]["params"])
        total = sum(p.numel() for p in self.model.parameters())
        counts = {m: sum(1 for x in self.layers.values() if x.mode is m) for m in Mode}
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines += ["-" * len(lines[0]),
                  f"layers: {counts[Mode.FULL]} full, {counts[Mode.LORA]} lora, {counts[Mode.FROZEN]} frozen",
                  f"trainable: {target_total:,} in target layers + {other:,} other = {target_total + other:,} "
                  f"of {total:,} ({100 * (target_total + other) / max(total, 1):.2f}%)"]
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Modes, ranks, LR scales, scores, history, group hyper-parameters and Adam state,
        keyed by parameter *name* (plain types and tensors only: loads with weights_only)."""
        names = {p: n for n, p in self.model.named_parameters()}
        return {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "layers": {name: {"mode": m.mode.value, "rank": m.rank, "alpha": m.alpha, "lr_scale": self.lr_scales[name],
                              "has_factors": m.lora_A is not None, "quantized": isinstance(m, QuantLoRALinear)}
                       for name, m in self.layers.items()},
            "scores": {k: dict(v) for k, v in self.scores.items()},
            "history": [dict(h) for h in self.history],
            "score_log": [dict(e) for e in self.score_log],
            "collector": self.collector.state_dict(),
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "roles": [list(r) for r in self._roles],
            "state": {names[p]: dict(s) for p, s in self.inner.state.items()},
            "policy": _plain(self.policy.config()),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Rebuild every layer's mode and rank, then restore the Adam state by parameter name.

        Call it on a fresh model + fresh optimizer *before* loading the model's weights (the
        modules must have the right shape first). A checkpoint from a different model, with
        missing or extra layers or parameters, or with mismatched shapes raises
        ``ValueError`` naming them, and changes nothing.
        """
        self._validate_checkpoint(state_dict)
        for name, record in state_dict["layers"].items():
            module = self.layers[name]
            module.set_mode(record["mode"], record["rank"])
            if record.get("has_factors") and module.lora_A is None:
                module.set_mode(Mode.LORA, record["rank"])
                module.set_mode(record["mode"], record["rank"])  # quantized FROZEN keeps frozen factors
            self.lr_scales[name] = float(record["lr_scale"])
        changed = self._reconcile()
        params = dict(self.model.named_parameters())
        self.inner.state.clear()
        for pname, values in state_dict["state"].items():
            p = params[pname]
            self.inner.state[p] = {k: (v.to(device=p.device, dtype=p.dtype if k != "step" else v.dtype).clone()
                                       if torch.is_tensor(v) else v) for k, v in values.items()}
        for group, saved in zip(self.param_groups, state_dict["groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.step_count = int(state_dict["step"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.scores = {name: dict(state_dict["scores"].get(name, {})) for name in self.layers}
        self.history = [dict(h) for h in state_dict["history"]]
        self.score_log = [dict(e) for e in state_dict.get("score_log", [])]
        self.collector.load_state_dict(state_dict.get("collector", {}))
        self.check_consistency()
        self._arm_for(self.step_count + 1)
        if changed:
            self._run_transition_hooks()

    def _validate_checkpoint(self, sd: Mapping[str, Any]) -> None:
        if not isinstance(sd, Mapping) or sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not an AdaptiveOptimizer checkpoint (format {sd.get('format') if isinstance(sd, Mapping) else type(sd).__name__!r}, "
                             f"expected {STATE_FORMAT!r})")
        saved, ours = set(sd["layers"]), set(self.layers)
        problems = []
        if saved - ours:
            problems.append(f"layers in the checkpoint but not in this model: {sorted(saved - ours)[:8]}")
        if ours - saved:
            problems.append(f"layers of this model missing from the checkpoint: {sorted(ours - saved)[:8]}")
        if [tuple(r) for r in sd.get("roles", [])] != self._roles and not problems:
            problems.append("parameter groups differ (different targets or target order)")
        if not problems:
            expected = self._expected_shapes(sd["layers"])
            for pname, values in sd["state"].items():
                if pname not in expected:
                    problems.append(f"state for {pname!r}, which would not train in this model")
                    continue
                shape = next((tuple(v.shape) for k, v in values.items() if k != "step" and torch.is_tensor(v)), None)
                if shape is not None and shape != expected[pname]:
                    problems.append(f"{pname}: checkpoint shape {shape}, model shape {expected[pname]}")
            for name, record in sd["layers"].items():
                if float(record.get("alpha", self.layers[name].alpha)) != self.layers[name].alpha:
                    problems.append(f"{name}: alpha {record['alpha']} in the checkpoint, {self.layers[name].alpha} here")
        if problems:
            raise ValueError("checkpoint does not match this model/optimizer; nothing was loaded:\n  - "
                             + "\n  - ".join(problems[:20]))

    def _expected_shapes(self, layers: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the parameters that would train after loading ``layers``."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, record in layers.items():
            m = self.layers[name]
            mode, rank = Mode.coerce(record["mode"]), int(record["rank"])
            if mode is Mode.LORA:
                shapes[f"{name}.lora_A"] = (rank, m.in_features)
                shapes[f"{name}.lora_B"] = (m.out_features, rank)
            elif mode is Mode.FULL:
                if hasattr(m, "delta"):
                    shapes[f"{name}.delta"] = (m.out_features, m.in_features)
                else:
                    shapes[f"{name}.base.weight"] = tuple(m.base.weight.shape)
                if m.base.bias is not None:
                    shapes[f"{name}.base.bias"] = tuple(m.base.bias.shape)
        full_blocks = self._full_blocks({name: Mode.coerce(r["mode"]) for name, r in layers.items()})
        for pname, p in self._extra_candidates():
            if pname not in shapes and self._extra_trains(pname, full_blocks):
                shapes[pname] = tuple(p.shape)
        return shapes
