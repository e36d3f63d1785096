"""The optimizer's checkpoint format (``adaptopt.AdaptiveOptimizer/1``, docs/design.md §9):
validation of a state dict before anything is loaded, and plain-typed policy configs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from .layout import Layout
from .modes import Mode
from .transitions import plan_trainable

if TYPE_CHECKING:
    from .optimizer import AdaptiveOptimizer

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


def validate_state_dict(opt: "AdaptiveOptimizer", sd: Mapping[str, Any]) -> dict[str, Layout]:
    """Check an optimizer state dict against ``opt`` and its model; return the layout every layer
    will take. Raises ``ValueError`` listing every mismatch; changes nothing."""
    if not isinstance(sd, Mapping) or sd.get("format") != STATE_FORMAT:
        found = sd.get("format") if isinstance(sd, Mapping) else type(sd).__name__
        raise ValueError(f"not an AdaptiveOptimizer checkpoint (format {found!r}, expected {STATE_FORMAT!r})")
    saved, ours = set(sd["layers"]), set(opt.layers)
    problems = []
    if saved - ours:
        problems.append(f"layers in the checkpoint but not in this model: {sorted(saved - ours)[:8]}")
    if ours - saved:
        problems.append(f"layers of this model missing from the checkpoint: {sorted(ours - saved)[:8]}")
    if [tuple(r) for r in sd.get("roles", [])] != opt._roles and not problems:
        problems.append("parameter groups differ (different targets or target order)")
    layouts: dict[str, Layout] = {}
    if not problems:
        for name, record in sd["layers"].items():
            current = opt.layers[name].layout()
            layouts[name] = Layout.from_record({k: v for k, v in record.items() if k != "merged"}, current)
            if layouts[name].alpha != current.alpha:
                problems.append(f"{name}: alpha {layouts[name].alpha} in the checkpoint, {current.alpha} here")
        expected = {pname: shape for pname, (_, shape) in
                    plan_trainable(opt.model, opt.layers, opt.rules, layouts).items()}
        for pname, values in sd["state"].items():
            if pname not in expected:
                problems.append(f"state for {pname!r}, which would not train in this model")
                continue
            shape = next((tuple(v.shape) for k, v in values.items() if k != "step" and torch.is_tensor(v)), None)
            if shape is not None and shape != expected[pname]:
                problems.append(f"{pname}: checkpoint shape {shape}, model shape {expected[pname]}")
    if problems:
        raise ValueError("checkpoint does not match this model/optimizer; nothing was loaded:\n  - "
                         + "\n  - ".join(problems[:20]))
    return layouts
