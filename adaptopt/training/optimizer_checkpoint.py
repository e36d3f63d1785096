"""Writing and restoring an :class:`~adaptopt.AdaptiveOptimizer`'s own state: what its
``state_dict()`` holds and how ``load_state_dict()`` puts it back (the format and its validation:
:mod:`adaptopt.training.optimizer_state`; docs/design.md §9).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..layers.sharded import gathered
from .optimizer_state import STATE_FORMAT, moment_like, plain_config, validate_state_dict

if TYPE_CHECKING:
    from .optimizer import AdaptiveOptimizer


def optimizer_state(opt: "AdaptiveOptimizer") -> dict[str, Any]:
    """:meth:`AdaptiveOptimizer.state_dict`."""
    names = {p: n for n, p in opt.model.named_parameters()}
    return {
        "format": STATE_FORMAT, "step": opt.step_count, "skipped_steps": opt.skipped_steps,
        "layers": {name: {**m.layout().to_record(), "lr_scale": opt.lr_scales[name],
                          "quantized": m.layout().quant is not None} for name, m in opt.layers.items()},
        "scores": {k: dict(v) for k, v in opt.scores.items()},
        "history": [dict(h) for h in opt.history],
        "score_log": [dict(e) for e in opt.score_log],
        "collector": opt.collector.state_dict(),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "roles": [list(r) for r in opt._roles],
        "state": {names[p]: {k: gathered(v) if torch.is_tensor(v) else v for k, v in s.items()}
                  for p, s in opt.inner.state.items()},
        "policy": plain_config(opt.policy.config()),
        "run_steps": opt.policy.run_steps,  # the run's length when first known (fixes fraction-placed steps)
        "scored_before_training": opt.policy.scored_before_training,  # the first decision came at step 0
    }


def restore_optimizer(opt: "AdaptiveOptimizer", sd: Mapping[str, Any]) -> None:
    """:meth:`AdaptiveOptimizer.load_state_dict`: everything validated before anything changes."""
    layouts = validate_state_dict(sd, layouts_now={n: m.layout() for n, m in opt.layers.items()},
                                  roles=opt._roles, group_count=len(opt.param_groups), plan=opt.plan,
                                  amsgrad=bool(opt.defaults.get("amsgrad", False)))
    saved_policy = sd.get("policy")
    if saved_policy is not None and saved_policy != plain_config(opt.policy.config()):
        warnings.warn(f"this checkpoint was written with policy {saved_policy}, this optimizer runs "
                      f"{plain_config(opt.policy.config())}: its modes and state load, and this policy decides "
                      "from here on", stacklevel=3)  # the caller of load_state_dict
    saved_run, now = sd.get("run_steps"), opt.policy.run_steps
    if saved_run is not None:
        opt.policy.run_steps = int(saved_run)  # the steps it placed stay where the saved run put them
        if now not in (None, saved_run):
            opt._warn_run_length(saved_run, now, stacklevel=4)
    opt.policy.scored_before_training = bool(sd.get("scored_before_training", False))
    for name, layout in layouts.items():
        opt.layers[name].adopt_layout(layout)
        opt.lr_scales[name] = float(sd["layers"][name]["lr_scale"])
    changed = opt._reconcile()
    params = dict(opt.model.named_parameters())
    opt.inner.state.clear()
    for pname, values in sd["state"].items():
        p = params[pname]
        opt.inner.state[p] = {k: (moment_like(p, v.to(device=p.device, dtype=p.dtype if k != "step" else v.dtype))
                                   if torch.is_tensor(v) else v) for k, v in values.items()}
    for group, saved in zip(opt.param_groups, sd["groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    opt.step_count = int(sd["step"])
    opt.skipped_steps = int(sd.get("skipped_steps", 0))
    opt.scores = {name: dict(sd["scores"].get(name, {})) for name in opt.layers}
    opt.history = [dict(h) for h in sd["history"]]
    opt.score_log = [dict(e) for e in sd.get("score_log", [])]
    opt.collector.load_state_dict(sd.get("collector", {}))
    opt.collector.window_seed = max((int(e.get("step", 0)) for e in opt.score_log), default=0)
    opt.collector.disarm()
    opt.check_consistency()
    opt._arm_for(opt.step_count + 1)
    if changed:
        opt._run_transition_hooks()
