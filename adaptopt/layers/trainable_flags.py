"""The one writer of ``requires_grad`` on a model's parameters (docs/design.md §4).

Whatever decides what trains — a layer keeping its own flags in step with its mode, the
optimizer's plan after a transition, an operation undone after a failure — sets the flags
through these functions and nowhere else (``tests/test_architecture.py`` enforces it), so
"which parameters require grad" has a single place to look. The module sits below the layers
and the training code alike and imports nothing of adaptopt.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn


def sync_layer_requires_grad(layer: Any) -> None:
    """A layer's own flags from its layout: what its mode trains (``layer.tensor_specs()``)
    requires grad, nothing else of the layer does."""
    specs = layer.tensor_specs()
    for name, p in layer.named_parameters():
        spec = specs.get(name)
        p.requires_grad_(bool(spec and spec.trains))


def train_exactly(model: nn.Module, trained: Iterable[nn.Parameter]) -> None:
    """Every floating parameter of ``model`` requires grad if and only if it is in ``trained``."""
    trained = set(trained)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(p in trained)


def capture_requires_grad(model: nn.Module) -> dict[nn.Parameter, bool]:
    """Every parameter's flag, to put back with :func:`restore_requires_grad`."""
    return {p: p.requires_grad for p in model.parameters()}


def restore_requires_grad(flags: Mapping[nn.Parameter, bool]) -> None:
    for p, flag in flags.items():
        p.requires_grad_(flag)
