"""Which parameters may differ from the base model they were loaded with.

:func:`adaptopt.save_adapters` saves only what changed. A parameter counts as changed once
it has trained (entered an optimizer group of :class:`~adaptopt.AdaptiveOptimizer`, or a
layer's FULL mode) or had an update folded into it (LORA → FULL / FROZEN, a rank cut,
``merge()``). The mark lives on the parameter object itself, so it follows the parameter
through ``.to(device)`` and any renaming of the modules around it.
"""
from __future__ import annotations

import torch

MARK = "_adaptopt_changed"


def mark_changed(*params: torch.Tensor | None) -> None:
    for p in params:
        if p is not None:
            setattr(p, MARK, True)


def is_changed(p: torch.Tensor) -> bool:
    """Marked as changed, or trainable right now (a user's own optimizer may train it)."""
    return bool(getattr(p, MARK, False)) or p.requires_grad


def capture_marks(model: torch.nn.Module) -> dict[torch.Tensor, bool]:
    """Every parameter's mark, to put back with :func:`restore_marks` if an operation fails."""
    return {p: bool(getattr(p, MARK, False)) for p in model.parameters()}


def restore_marks(marks: dict[torch.Tensor, bool]) -> None:
    for p, marked in marks.items():
        if marked:
            setattr(p, MARK, True)
        elif hasattr(p, MARK):
            delattr(p, MARK)
