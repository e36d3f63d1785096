"""The optimizer's checkpoint format (``adaptopt.AdaptiveOptimizer/1``, docs/design.md §9) and its
validation: :func:`validate_state_dict` checks a whole state dict against explicit facts about
the optimizer it would load into (its layers, group roles, group count, trainable plan) and
changes nothing. :meth:`AdaptiveOptimizer.state_dict` writes the format and
:meth:`AdaptiveOptimizer.load_state_dict` restores it, after this validation passed."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from ..layers.layout import Layout
from ..layers.sharded import is_sharded, shard_like
from ..modes import Mode

STATE_FORMAT = "adaptopt.AdaptiveOptimizer/1"


def plain_config(value: Any) -> Any:
    """``value`` with enums, dataclasses and tuples turned into str / dict / list (safe to torch.load)."""
    from dataclasses import asdict, is_dataclass
    if isinstance(value, Mode):
        return value.value
    if is_dataclass(value) and not isinstance(value, type):
        return plain_config(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value


REQUIRED = ("step", "layers", "scores", "history", "groups", "roles", "state")
MOMENTS = ("exp_avg", "exp_avg_sq")


def _number(value: Any, *, minimum: float | None = None, integer: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int):
        return False
    return math.isfinite(value) and (minimum is None or value >= minimum)


def _check_moments(pname: str, values: Any, shape: tuple[int, ...], amsgrad: bool, problems: list[str]) -> None:
    if not isinstance(values, Mapping):
        problems.append(f"state[{pname!r}]: expected a mapping of Adam state, got {type(values).__name__}")
        return
    saved_shape = next((tuple(v.shape) for k, v in values.items() if k != "step" and torch.is_tensor(v)), None)
    if saved_shape is not None and saved_shape != shape:
        problems.append(f"{pname}: checkpoint shape {saved_shape}, model shape {shape}")
        return
    step = values.get("step")
    step_value = step.item() if torch.is_tensor(step) and step.numel() == 1 else step
    if not _number(step_value, minimum=0):
        problems.append(f"state[{pname!r}].step: expected a finite number ≥ 0, got {step!r}")
    for key in MOMENTS + (("max_exp_avg_sq",) if amsgrad else ()):
        t = values.get(key)
        if not torch.is_tensor(t):
            problems.append(f"state[{pname!r}].{key}: missing (or not a tensor)")
        elif tuple(t.shape) != shape:
            problems.append(f"state[{pname!r}].{key}: checkpoint shape {tuple(t.shape)}, model shape {shape}")
        elif not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            problems.append(f"state[{pname!r}].{key}: holds NaN or inf (or is not floating point)")
        elif key != "exp_avg" and bool((t < 0).any()):
            problems.append(f"state[{pname!r}].{key}: holds negative values (a second moment is ≥ 0)")


def _check_groups(groups: Any, count: int, problems: list[str]) -> None:
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        problems.append("groups: expected a list of mappings")
        return
    if len(groups) != count:
        problems.append(f"groups: {len(groups)} in the checkpoint, {count} in this optimizer")
    for i, g in enumerate(groups):
        for key in ("lr", "initial_lr", "weight_decay", "eps"):
            if key in g and not _number(g[key], minimum=0):
                problems.append(f"groups[{i}].{key}: expected a finite number ≥ 0, got {g[key]!r}")
        betas = g.get("betas", (0.9, 0.999))
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_number(b, minimum=0) and b < 1 for b in betas)):
            problems.append(f"groups[{i}].betas: expected two numbers in [0, 1), got {betas!r}")


def _check_plain(sd: Mapping[str, Any], problems: list[str]) -> None:
    if not _number(sd["step"], minimum=0, integer=True):
        problems.append(f"step: expected an int ≥ 0, got {sd['step']!r}")
    if sd.get("run_steps") is not None and not _number(sd["run_steps"], minimum=1, integer=True):
        problems.append(f"run_steps: expected an int ≥ 1 or None, got {sd['run_steps']!r}")
    if not isinstance(sd.get("scored_before_training", False), bool):
        problems.append(f"scored_before_training: expected true or false, got {sd['scored_before_training']!r}")
    if "skipped_steps" in sd and not _number(sd["skipped_steps"], minimum=0, integer=True):
        problems.append(f"skipped_steps: expected an int ≥ 0, got {sd['skipped_steps']!r}")
    if not isinstance(sd["scores"], Mapping) or not all(isinstance(v, Mapping) for v in sd["scores"].values()):
        problems.append("scores: expected a mapping of layer name → mapping of scores")
    for key in ("history", "score_log"):
        if key in sd and (not isinstance(sd[key], list) or not all(isinstance(h, Mapping) for h in sd[key])):
            problems.append(f"{key}: expected a list of mappings")
    collector = sd.get("collector", {})
    if not isinstance(collector, Mapping) or not all(
            isinstance(v, Mapping) and all(_number(x, minimum=0) for x in v.values()) for v in collector.values()):
        problems.append("collector: expected a mapping of layer name → finite, non-negative sums")
    if not isinstance(sd["state"], Mapping):
        problems.append("state: expected a mapping of parameter name → Adam state")


def validate_state_dict(sd: Mapping[str, Any], *, layouts_now: Mapping[str, Layout], roles: list[tuple[str, Any]],
                        group_count: int, plan: Callable[[Mapping[str, Layout]], Mapping[str, tuple[Any, tuple]]],
                        amsgrad: bool) -> dict[str, Layout]:
    """Check a whole optimizer state dict before anything is loaded — keys, types, layer records,
    LR scales, group hyper-parameters, and every Adam moment (present, finite, the right shape,
    second moments ≥ 0) — against the optimizer it would load into: its layers' current
    ``layouts_now``, its group ``roles`` and ``group_count``, and ``plan(layouts)``, what would
    train (and its shapes) with the layers in given layouts. Returns the layout every layer will
    take. Raises one ``ValueError`` listing every problem. Pure: nothing is changed."""
    if not isinstance(sd, Mapping) or sd.get("format") != STATE_FORMAT:
        found = sd.get("format") if isinstance(sd, Mapping) else type(sd).__name__
        raise ValueError(f"not an AdaptiveOptimizer checkpoint (format {found!r}, expected {STATE_FORMAT!r})")
    missing = [key for key in REQUIRED if key not in sd]
    if missing:
        raise ValueError(f"optimizer checkpoint lacks {missing}; nothing was loaded (was it written by "
                         "AdaptiveOptimizer.state_dict()?)")
    problems: list[str] = []
    _check_plain(sd, problems)
    _check_groups(sd["groups"], group_count, problems)
    if not isinstance(sd["layers"], Mapping):
        problems.append("layers: expected a mapping of layer name → record")
    else:
        saved, ours = set(sd["layers"]), set(layouts_now)
        if saved - ours:
            problems.append(f"layers in the checkpoint but not in this model: {sorted(saved - ours)[:8]}")
        if ours - saved:
            problems.append(f"layers of this model missing from the checkpoint: {sorted(ours - saved)[:8]}")
        if not isinstance(sd["roles"], list) or [tuple(r) for r in sd["roles"]] != list(roles):
            problems.append("parameter groups differ (different targets or target order)")
    layouts: dict[str, Layout] = {}
    if not problems:
        for name, record in sd["layers"].items():
            current = layouts_now[name]
            try:
                layouts[name] = Layout.from_record({k: v for k, v in record.items() if k != "merged"}, current)
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                problems.append(f"layers[{name!r}]: malformed record ({type(exc).__name__}: {exc})")
                continue
            if layouts[name].alpha != current.alpha:
                problems.append(f"{name}: alpha {layouts[name].alpha} in the checkpoint, {current.alpha} here")
            if not _number(record.get("lr_scale"), minimum=0):
                problems.append(f"layers[{name!r}].lr_scale: expected a finite number ≥ 0, got "
                                f"{record.get('lr_scale')!r}")
    if not problems:
        expected = {pname: shape for pname, (_, shape) in plan(layouts).items()}
        for pname, values in sd["state"].items():
            if pname not in expected:
                problems.append(f"state for {pname!r}, which would not train in this model")
            else:
                _check_moments(pname, values, expected[pname], amsgrad, problems)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError("checkpoint does not match this model/optimizer; nothing was loaded:\n  - "
                         + "\n  - ".join(problems[:20]) + more)
    return layouts


def moment_like(p: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """A saved moment (whole, as :func:`optimizer_state` writes it) for ``p``: this rank's rows
    of it when FSDP2 shards ``p`` (so a checkpoint loads at any world size)."""
    if is_sharded(p) and not is_sharded(saved) and saved.dim() > 0:
        return shard_like(p, saved)
    return saved.clone()
