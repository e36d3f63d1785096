"""Putting modules into a model and taking them back out, whole or not at all.

- :class:`ModuleSwap` replaces submodules by name; ``undo()`` puts every original back and
  restores every parameter's ``requires_grad`` and changed-mark as they were.
- :class:`RestorePoint` remembers everything an operation on existing adapter layers may change
  (layouts, tensors, flags, marks), so a failure midway leaves the model as it was.

Injection, loading adapters, ``merge_and_unload`` and the optimizer's constructor use them:
"validate everything before changing anything, and undo what a failure left half-done".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import nn

from ..layers.changed_marks import capture_marks, restore_marks
from ..layers.trainable_flags import capture_requires_grad, restore_requires_grad

if TYPE_CHECKING:
    from ..layers.lora import LoRALinear


class ModuleSwap:
    """Replace submodules of ``model`` by name; :meth:`undo` puts every original back and
    restores every parameter's ``requires_grad`` and changed-mark as they were when the swap
    began. With ``follow_training=True`` a module put in takes the training flag of the module
    it joins (a model loaded in eval mode gets loaded adapters in eval mode: no adapter dropout
    at inference)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = capture_requires_grad(model)
        self.marks = capture_marks(model)
        self._modules = dict(model.named_modules())
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self._undo_steps: list[Callable[[], None]] = []

    def put(self, name: str, module: nn.Module, follow_training: bool = False) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self._modules[parent_name] if parent_name else self.model
        self._replaced.append((parent, child, getattr(parent, child)))
        if follow_training:
            module.train(parent.training)
        setattr(parent, child, module)

    def on_undo(self, step: Callable[[], None]) -> None:
        """Also run ``step`` on :meth:`undo` (before the modules go back), e.g. a config flag's restore."""
        self._undo_steps.append(step)

    def undo(self) -> None:
        for step in reversed(self._undo_steps):
            step()
        self._undo_steps.clear()
        for parent, child, original in reversed(self._replaced):
            setattr(parent, child, original)
        self._replaced.clear()
        restore_requires_grad(self.flags)
        restore_marks(self.marks)


class RestorePoint:
    """Everything an operation on ``model``'s existing adapter ``layers`` may change — their
    layouts and tensors, every parameter's ``requires_grad`` and changed-mark — so that
    :meth:`undo` can put it back when the operation fails midway."""

    def __init__(self, model: nn.Module, layers: Mapping[str, "LoRALinear"]) -> None:
        self.flags = capture_requires_grad(model)
        self.marks = capture_marks(model)
        self.layers = dict(layers)
        self.saved = {name: (m.layout(), {t: m.get_parameter(t).detach().clone() for t in m.tensor_specs()})
                      for name, m in self.layers.items()}

    def undo(self) -> None:
        with torch.no_grad():
            for name, (layout, tensors) in self.saved.items():
                module = self.layers[name]
                module.unmerge()
                module.adopt_layout(layout)
                for tensor, value in tensors.items():
                    module.get_parameter(tensor).copy_(value)
                if layout.merged:
                    module.mark_merged_from_load()
        restore_requires_grad(self.flags)
        restore_marks(self.marks)
