"""``AdaptiveOptimizer``: AdamW that owns a per-layer state machine (frozen / LoRA r / full).

In a raw loop ``loss.backward(); opt.step(); opt.zero_grad()`` does everything: after each
update the policy may decide, and the chosen layers change mode in place (function-
preserving, :meth:`adaptopt.LoRALinear.set_mode`), with only their own optimizer state
touched. Its param groups never change in number, and each layer's LR scale multiplies its
groups' scheduled lr during the update (:mod:`adaptopt.training.param_groups`).
"""
from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..layers.lora import LoRALinear
from ..layers.sharded import is_sharded, local_tensor, refuse_sharded_4bit
from ..modes import Mode
from ..name_patterns import EMBEDDINGS, output_layer
from ..peft_arguments import accepts_peft_names, peft_trainable
from ..policies import DEFAULT_POLICY, LayerDecision, LayerView, Policy, build_policy
from ..policies.base import check_positive_int
from ..surgery.inject import (
    DEFAULT_ALPHA,
    DEFAULT_RANK,
    Targets,
    find_adapters,
    inject_with_undo,
    output_adapter_target,
    warn_if_rewrapped,
)
from ..surgery.swap import RestorePoint
from .arguments import TASK_HEADS, adamw_kernel, check_arguments, refuse_deepspeed
from .budget import resolve_budget, within_budget
from .distributed import (
    ReplicatedGradients,
    active_group,
    all_ranks_agree,
    all_reduce_stats,
    broadcast_decisions,
    broadcast_parameters,
)
from .layer_stats import StatsCollector
from .optimizer_checkpoint import optimizer_state, restore_optimizer
from .param_groups import layer_groups, scaled_lrs
from .policy_inputs import layer_views, refresh_weight_scores
from .run_length import run_length_change, run_too_short
from .scoring_pass import score_before_training
from .summary import layer_table, one_line
from .transitions import TrainRules, apply_decisions, check_consistency, plan_trainable, reconcile


class AdaptiveOptimizer(torch.optim.Optimizer):
    """AdamW over a model whose target layers a policy moves between FROZEN, LORA and FULL.

    Args:
        model: any ``nn.Module``. Adapters are injected (``targets``, ``rank``, ``alpha``,
            ``dropout``, ``rslora``, ``quantize``) unless the model already has some.
        lr: learning rate of full weights and non-target parameters.
        policy: a :class:`~adaptopt.policies.Policy`, a method name (``"lora"``) or a mapping
            (``{"method": "lora", "rank": 16}``); default ``"hybrid"``, the one default of adaptopt
            (:data:`adaptopt.policies.DEFAULT_POLICY`; docs/policies.md says why).
        lora_lr: learning rate of adapter factors; default ``10 × lr`` (measured: LoRA at the
            full-fine-tuning LR learns nothing on MiniLM / Rotten Tomatoes, docs/design.md §4).
        lora_plus_ratio: LoRA+ (Hayou et al., 2024): ``B`` trains at ``ratio × lora_lr`` in a group of
            its own per layer, ``A`` at ``lora_lr`` (default ``None``: one LR for both).
        init: how adapters start, ``"default"`` (B = 0) or ``"pissa"`` (the weight's principal
            part, :class:`~adaptopt.LoRALinear`); whenever a layer enters LORA.
        train_other: whether non-target parameters (embeddings, norms, biases outside FULL
            blocks) train. Task heads train regardless (see ``trainable``).
        trainable: name patterns (regex over dotted name runs) of non-target parameters that
            always train; default the task heads ``classifier`` and ``score``.
        frozen: name patterns that never train (wins over everything but FULL targets).
        steps_per_epoch: epoch length for policies that decide "u times per epoch" (the HF
            callback sets it for you).
        total_steps: the run's length in optimizer steps, for policies that act at a fraction
            of it (``Hybrid(freeze_at=0.6)``); the HF and Lightning callbacks set it for you.
        nonfinite: what a step with NaN/inf gradients does: ``"skip"`` (default: no update, no
            decision, ``skipped_steps += 1``), ``"raise"`` (``FloatingPointError``) or
            ``"ignore"`` (no check, no host sync).
        process_group: under ``torch.distributed``, the ranks that must agree (default: the
            world when it is initialized). Scores are summed over them and rank 0's decisions
            applied everywhere (:mod:`adaptopt.training.distributed`).
        bias, modules_to_save, task_type: PEFT's settings where they mean something here:
            ``bias="all"`` trains every bias, ``"lora_only"`` the adapted layers'; ``modules_to_save``
            modules train fully (added to ``trainable``); ``task_type`` is checked against the model's
            class (:func:`adaptopt.peft_arguments.peft_trainable`).
        memory_budget: a limit on training memory — bytes (``"24GB"``), a multiple of LoRA's
            (``"1.3x"``) or ``"lora+25%"`` — or a :class:`~adaptopt.MemoryBudget` naming the step
            whose activations count. Hybrid, AutoMode, LISA and BAdam spend it on FULL blocks in order
            of importance; no policy exceeds it; below LoRA's cost it is refused
            (:mod:`adaptopt.training.budget`, docs/optimizer.md). ``opt.memory_budget`` holds the figures.
        train_embeddings: whether the input embeddings and the output layer train, for any policy
            (:data:`adaptopt.name_patterns.EMBEDDINGS`); ``"output"``: the output layer only (a language
            model's head — tied models share it with the input embeddings; a classifier's head trains
            anyway); ``"output_lora"``: a LoRA adapter (at ``rank``) on the output layer for the whole run,
            which the policy does not decide (a tied head gets its own copy of the weight first:
            :mod:`adaptopt.surgery.output_adapter`); ``None`` (default): as the policy says (LISA and
            Full: both train; Hybrid: the output adapter; the others: neither).
        **adamw_kwargs: passed to ``torch.optim.AdamW`` (``betas``, ``eps``, ``weight_decay``, ...);
            unless ``fused`` or ``foreach`` is given, the fused kernel where torch has one for the
            model's device, else ``foreach`` (:func:`~adaptopt.training.arguments.adamw_kernel`).

    A block whose targets are all FULL also trains its other parameters (norms, biases).
    """

    @accepts_peft_names
    def __init__(self, model: nn.Module, lr: float = 1e-4, policy: Policy | str | Mapping[str, Any] = DEFAULT_POLICY,
                 *,
                 lora_lr: float | None = None, rank: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0,
                 rslora: bool = False, targets: Targets = "auto", quantize: Any = None, init: str = "default",
                 lora_plus_ratio: float | None = None, train_other: bool = False,
                 trainable: Iterable[str] = TASK_HEADS, frozen: Iterable[str] = (),
                 steps_per_epoch: int | None = None, total_steps: int | None = None, nonfinite: str = "skip",
                 process_group: Any = None, bias: str = "none", modules_to_save: Iterable[str] | None = None,
                 task_type: str | None = None, memory_budget: Any = None, train_embeddings: bool | str | None = None,
                 **adamw_kwargs: Any) -> None:
        own = [n for n in inspect.signature(AdaptiveOptimizer.__init__).parameters if n not in ("self", "adamw_kwargs")]
        lora_lr, self.lora_plus_ratio = check_arguments(lr, lora_lr, lora_plus_ratio, nonfinite, steps_per_epoch,
                                                        total_steps, adamw_kwargs, own)
        peft_trainable(model, [], bias, modules_to_save, task_type)  # checked before anything changes
        if train_embeddings not in (None, True, False, "output", "output_lora"):
            raise ValueError(f"train_embeddings is True, False, 'output' (the output layer only), 'output_lora' (an "
                             f"adapter on it) or None (the policy's choice), got {train_embeddings!r}")
        refuse_deepspeed(model)
        adamw_kwargs = adamw_kernel(list(model.parameters()), adamw_kwargs)
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr, **adamw_kwargs)  # validates betas, eps, ...
        self.policy = build_policy(policy)
        self.policy.run_steps = None  # a policy object belongs to one run (docs/design.md §7)
        self.policy.scored_before_training = False
        self.total_steps: int | None = None  # this run's length (set_total_steps); the policy keeps the first
        self._warned_run_length = False
        self.model = model
        existing = find_adapters(model)
        restore, swap = RestorePoint(model, existing), None
        try:
            adapt_output = train_embeddings == "output_lora" or (train_embeddings is None
                                                                  and self.policy.adapts_output_layer)
            head = output_adapter_target(model, required=train_embeddings == "output_lora") if adapt_output else None
            if existing:
                warn_if_rewrapped(existing, rank, alpha)
                self.layers: dict[str, LoRALinear] = existing
            else:
                self.layers, swap = inject_with_undo(
                    model, targets, DEFAULT_RANK if rank is None else rank, DEFAULT_ALPHA if alpha is None else alpha,
                    dropout=dropout, rslora=rslora, quantize=quantize if quantize is not None else self.policy.quantize,
                    init=init, output_adapter=head)
            # the output adapter trains all run, never shown to the policy (docs/optimizer.md, "The output layer")
            self.output_adapter = head if head in self.layers else None
            user = tuple(trainable) + tuple(peft_trainable(model, list(self.layers), bias, modules_to_save))
            if train_embeddings and train_embeddings != "output_lora":
                user += output_layer(model) if train_embeddings == "output" else EMBEDDINGS
            frozen = tuple(frozen) + (EMBEDDINGS if train_embeddings is False else ())
            rules = TrainRules(bool(train_other), user + tuple(self.policy.trainable_extra()), frozen)
            self.policy.memory_budget, self.memory_budget = None, None
            if memory_budget is not None:
                self.policy.memory_budget, self.memory_budget = resolve_budget(
                    memory_budget, model, self.layers, rules, TrainRules(bool(train_other), user, tuple(frozen)))
            self._build(float(lr), float(lora_lr), rules, steps_per_epoch, nonfinite, process_group, adamw_kwargs)
        except BaseException:
            if swap is not None:
                swap.undo()  # a failed constructor leaves the model exactly as it was
            restore.undo()
            raise
        if total_steps is not None:
            self.set_total_steps(total_steps)
        if not self.trainable_parameter_count():
            warnings.warn(f"AdaptiveOptimizer: policy {self.policy.method!r} trains no parameter of this "
                          f"{type(model).__name__} (no target layer trains and no other parameter is admitted); "
                          "pass trainable=[...] or train_other=True, or choose another policy", stacklevel=2)

    def _build(self, lr: float, lora_lr: float, rules: TrainRules, steps_per_epoch: int | None, nonfinite: str,
               process_group: Any, adamw_kwargs: dict[str, Any]) -> None:
        self.lr, self.lora_lr, self.rules = lr, lora_lr, rules
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
        self._sharded = any(is_sharded(p) for p in self.model.parameters())  # FSDP2 (fully_shard) came first
        refuse_sharded_4bit({name: m.base.weight for name, m in self.layers.items()
                             if getattr(m, "quant_config", None) is not None})
        self._replicated = ReplicatedGradients()
        self._transition_hooks: OrderedDict[int, Callable[["AdaptiveOptimizer"], None]] = OrderedDict()

        self._roles, groups = layer_groups(self.layers, self.lr, self.lora_lr, self.lora_plus_ratio)
        self._group_of_role = {role: i for i, role in enumerate(self._roles)}
        defaults = {"lr": self.lr, **adamw_kwargs}
        super().__init__(groups, defaults)
        self.inner = torch.optim.AdamW(self.param_groups, **{"lr": self.lr, **adamw_kwargs})
        self.param_groups = self.inner.param_groups  # one list: schedulers and AdamW see the same groups
        self.state = self.inner.state
        self.defaults = self.inner.defaults  # betas etc., which OneCycleLR looks for

        wanted = self.policy.statistics()
        self.collector = StatsCollector(self.layers, gradient=wanted.gradient, activations=wanted.activations,
                                        frozen_layers=wanted.frozen_layers)
        if self.collector.step_gradients is not None:
            self.collector.step_gradients.group = self._fsdp_group()  # FSDP2: scores of the global batch
        self._refresh_weight_scores(0)
        self._apply(self._agreed(self.policy.initial(self.views(), self.scores)), reason="initial")
        self._arm_for(1)

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Tell epoch-counting policies the epoch length (optimizer steps per epoch); the HF
        callback calls this at the start of training."""
        self.steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
        self._arm_for(self.step_count + 1)

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the optimizer how many optimizer steps the run takes; the HF and Lightning callbacks
        call this at the start of training.

        Decisions a policy places at a fraction of the run (``Hybrid(freeze_at=0.6)``) are fixed to
        steps the first time the length is known, and that length is saved in :meth:`state_dict`: a
        resumed run keeps them. A later call with another length (a resume that runs longer) warns
        once, naming both lengths and the steps kept. A run too short for the policy's schedule (its
        first decision at or after the last step) warns too, naming the steps."""
        total_steps = check_positive_int("total_steps", total_steps)
        fixed = self.policy.run_steps
        if fixed is None or not self.policy.placed_by_run_length():
            self.policy.run_steps = total_steps  # first known, or nothing was placed by the old length
        elif fixed != total_steps:
            self._warn_run_length(fixed, total_steps, stacklevel=3)
        self.total_steps = total_steps
        self._warn_if_run_too_short()

    def _warn_run_length(self, fixed: int, new: int, stacklevel: int) -> None:
        message = run_length_change(self.policy, fixed, new)
        if message and not self._warned_run_length:
            self._warned_run_length = True
            warnings.warn(message, stacklevel=stacklevel + 1)

    def _warn_if_run_too_short(self) -> None:
        message = run_too_short(self.policy, self.total_steps, self.steps_per_epoch)
        if message:
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ views
    def views(self) -> dict[str, LayerView]:
        """What a policy sees of each layer (:func:`~adaptopt.training.policy_inputs.layer_views`): every
        layer but the output adapter."""
        return layer_views({n: m for n, m in self.layers.items() if n != self.output_adapter}, self.lr_scales)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def _grads_finite(self) -> bool:
        """Are all gradients finite? Under FSDP2 each rank checks its shards and the ranks agree
        (a NaN lands in one rank's shard only; every rank must skip the step alike)."""
        grads = [local_tensor(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])).all())
        group = self._fsdp_group()
        return finite if group is None else all_ranks_agree(finite, group)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One AdamW update with per-layer LR scales, then the policy's decision if due.

        With ``nonfinite="skip"`` a step whose gradients hold NaN/inf changes no weight and
        triggers no transition; it only counts ``skipped_steps``.
        """
        if self.steps_per_epoch is None and self.policy.needs_epochs():
            raise ValueError(f"policy {self.policy.method!r} counts in epochs: pass steps_per_epoch= to "
                             "AdaptiveOptimizer or call opt.set_steps_per_epoch(n) (the HF Trainer's "
                             "AdaptoptCallback and Lightning's adaptopt.integrations.lightning.AdaptoptLightning "
                             "do it for you); nothing was updated")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite != "ignore" and not self._grads_finite():
            if self.nonfinite == "raise":
                bad = [self._name_of(p) for g in self.param_groups for p in g["params"]
                       if p.grad is not None and not bool(torch.isfinite(local_tensor(p.grad)).all())]
                raise FloatingPointError(f"non-finite gradients in {bad[:8]}: lower the LR, clip gradients or "
                                         "use a GradScaler; nothing was updated")
            self.skipped_steps += 1
            self.collector.discard()  # the skipped step's statistics leave no trace
            return loss
        self.collector.observe_step()  # cheap scores read this step's gradients before the update
        with scaled_lrs(self.param_groups, self._roles, self.lr_scales):
            self.inner.step()
        self.collector.commit()
        self.step_count += 1
        if self.policy.is_decision_step(self.step_count, self.steps_per_epoch):
            self.decide()
        self._arm_for(self.step_count + 1)
        return loss

    def score_before_training(self, closure: Callable[[], Any]) -> bool:
        """A scoring pass before the first step (:mod:`~adaptopt.training.scoring_pass`): ``closure``
        runs forward and backward on one training batch (``lambda: model(**batch).loss.backward()``);
        its gradients are scored and dropped, no weight or random state changes, and a policy that
        decides from one batch (``Hybrid(calibration_steps=1)``, the default) decides now, so the first
        update already trains its FULL units. Returns whether it decided. The HF Trainer callback runs
        it on the first training batch."""
        return score_before_training(self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; statistics of a step that never reached :meth:`step` (a
        ``GradScaler`` skipped it) are dropped with them."""
        self.collector.discard()
        self.inner.zero_grad(set_to_none=set_to_none)

    def decide(self) -> dict[str, LayerDecision]:
        """Ask the policy now (normally called by :meth:`step` at its decision points)."""
        group = active_group(self.process_group)
        if group is not None:
            all_reduce_stats(self.collector, group)
        collected = (self.collector.scores() if any(s.count or s.batches for s in self.collector.stats.values())
                     else {})
        for name, values in collected.items():
            self.scores[name].update(values)
        self._refresh_weight_scores(self.step_count)
        decisions = self.policy.decide(self.views(), self.scores, self.step_count, self.steps_per_epoch)
        self._apply(self._agreed(decisions), reason="decision")
        self.collector.reset(window_seed=self.step_count)
        return decisions

    def _agreed(self, decisions: Mapping[str, LayerDecision]) -> Mapping[str, LayerDecision]:
        """Under ``torch.distributed``, rank 0's decisions (every rank must transition alike)."""
        group = active_group(self.process_group)
        return decisions if group is None else broadcast_decisions(decisions, list(self.layers), group)

    def _refresh_weight_scores(self, step: int) -> None:
        """The weight-only score families the policy needs at ``step``, into ``scores``; then log
        every layer's scores (:func:`~adaptopt.training.policy_inputs.refresh_weight_scores`)."""
        families = self.policy.weight_scores(step, self.steps_per_epoch)
        refresh_weight_scores(self.layers, self.scores, families)
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
        self._arm_for(self.step_count + 1)

    def _apply(self, decisions: Mapping[str, LayerDecision], reason: str) -> None:
        """Carry decisions out (:func:`~adaptopt.training.transitions.apply_decisions`), log them, and
        make the trained set follow (:func:`~adaptopt.training.transitions.reconcile`). Under a memory
        budget, an initial or manual assignment above it is refused, a decision is cut to fit
        (:func:`~adaptopt.training.budget.within_budget`)."""
        if self.policy.memory_budget is not None:
            decisions = within_budget(self.policy.memory_budget, self.views(), decisions, self.policy.method,
                                      initial=reason != "decision")
        records = apply_decisions(self.layers, decisions, self.lr_scales)
        self.collector.disarm()  # its hooks sit on the tensors the layers had; callers re-arm (_arm_for)
        for record in records:
            self.history.append({"step": self.step_count, "layer": record["layer"], "reason": reason,
                                 **{k: v for k, v in record.items() if k != "layer"},
                                 "scores": dict(self.scores.get(record["layer"], {}))})
        group = active_group(self.process_group)
        if group is not None:  # factors a transition made start alike on every rank (FSDP2, DDP)
            broadcast_parameters([p for r in records for name, p in self.layers[r["layer"]].named_parameters()
                                  if not is_sharded(p) and (self._sharded or name in ("lora_A", "lora_B"))], group)
        if self._reconcile():
            self._run_transition_hooks()
        self.check_consistency()

    def register_transition_hook(self, hook: Callable[["AdaptiveOptimizer"], None]
                                 ) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(optimizer)`` whenever the set of trained parameters changes (a transition,
        or :meth:`load_state_dict`), after the change. Wrappers that bind parameters when they
        are built (DDP) rebuild themselves here. Returns a handle whose ``remove()`` detaches it."""
        handle = torch.utils.hooks.RemovableHandle(self._transition_hooks)
        self._transition_hooks[handle.id] = hook
        return handle

    def _run_transition_hooks(self) -> None:
        for hook in list(self._transition_hooks.values()):
            hook(self)

    def plan(self, layouts: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What trains, and in which group, with the layers in ``layouts`` (default: as they are)."""
        return plan_trainable(self.model, self.layers, self.rules, layouts, self.lora_plus_ratio is not None)

    def _reconcile(self) -> bool:
        changed = reconcile(self.model, self.inner, self._group_of_role, self.plan())
        group = self._fsdp_group()
        if changed and group is not None:
            self._replicated.watch([p for g in self.param_groups for p in g["params"] if not is_sharded(p)], group)
        return changed

    def _fsdp_group(self) -> Any | None:
        """The group FSDP2 shards this model over, when it does (docs/design.md §8)."""
        return active_group(self.process_group) if self._sharded else None

    def _name_of(self, p: nn.Parameter) -> str:
        return next((n for n, q in self.model.named_parameters() if q is p), f"<unnamed {tuple(p.shape)}>")

    def check_consistency(self) -> dict[str, Any]:
        """Verify, and record in ``last_check``, that the trainable set, the optimizer's
        parameters and its state entries agree (:func:`~adaptopt.training.transitions.check_consistency`)."""
        self.last_check = check_consistency(self.model, self.inner, self.step_count)
        return self.last_check

    # ------------------------------------------------------------------ reporting
    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    def summary(self) -> str:
        """A table of layers × mode / rank / LR scale / trainable parameters, with totals."""
        return layer_table(self.model, self.layers, self.lr_scales, self.param_groups[0]["params"])

    def print_trainable_parameters(self) -> None:
        """Print one line, as PEFT's method of this name does: trainable / all parameters, the
        percentage, and the layers per mode (:meth:`summary` has the whole table)."""
        print(one_line(self.model, self.layers, self.trainable_parameter_count()))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Modes, ranks, LR scales, scores, history, group hyper-parameters and Adam state, keyed
        by parameter *name*: plain types and tensors only, so it loads with ``weights_only``
        (format ``adaptopt.AdaptiveOptimizer/1``, docs/design.md §9). Under FSDP2 the Adam moments
        are gathered whole, as one process writes them."""
        return optimizer_state(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Rebuild every layer's mode and rank, then restore the Adam state by parameter name.

        Call it on a fresh model + fresh optimizer *before* loading the model's weights (the
        modules must have the right shape first). The whole dict is validated first
        (:func:`~adaptopt.training.optimizer_state.validate_state_dict`): a checkpoint from a
        different model, with missing or extra layers or parameters, mismatched shapes or
        malformed values raises one ``ValueError`` naming them, and changes nothing.
        """
        restore_optimizer(self, state_dict)
