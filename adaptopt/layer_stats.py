"""Per-layer statistics gathered by hooks, only on the steps a policy asks for.

While armed, each target layer accumulates (on device, no host sync):

- ``act_sq``, ``act_abs``: ``Σ x²``, ``Σ |x|`` and ``count`` over its inputs →
  ``act_rms = √(Σx² / count)``, ``act_mean_abs = Σ|x| / count``;
- ``grad_sq``: ``‖δᵀx‖²_F``, the squared Frobenius norm of the gradient the *full* weight
  would receive (``δ`` = gradient at the layer output), whatever the layer's mode. This
  makes gradient scores comparable across FROZEN / LORA / FULL (docs/design.md §6).

Costs on an armed step: one extra ``(out × N) @ (N × in)`` matmul per layer in the
backward pass (the size of a full weight gradient), and autograd through frozen layers
(their inputs are made to require grad so ``δ`` exists everywhere). Disarmed: no hooks.
Forward passes in eval mode or under ``torch.no_grad()`` (evaluation between training
steps) are not counted.

A step's sums count once the optimizer commits them after a successful update
(:meth:`StatsCollector.commit`); a step skipped for non-finite gradients (by the optimizer, or
by a ``GradScaler`` that never called it) is rolled back, so it leaves no trace in the next
decision. Sums that turned non-finite are never committed.

The gradient score is the RMS over micro-batches of ``‖δ_bᵀx_b‖_F`` (each backward pass), not
the norm of the step's summed gradient: summing ``δ_bᵀx_b`` over micro-batches before the norm
would need a weight-sized buffer per layer (a full fine-tune's gradient memory) for layers
that do not train fully. So a step split into more micro-batches scores somewhat differently
(docs/design.md §6); under DDP every rank's micro-batches count alike.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _inputs_require_grad(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a frozen layer below every trainable one gets an input that requires
    grad, so that ``δ`` reaches it on scoring steps (its input is a leaf: nothing upstream trains)."""
    x = args[0]
    if (module.training and torch.is_grad_enabled() and not x.requires_grad
            and not any(p.requires_grad for p in module.parameters())):  # a trainable layer's output has δ anyway
        return (x.detach().requires_grad_(True), *args[1:])
    return None


SUM_SLOTS = (0, 1, 3)  # act_sq, act_abs, grad_sq: the floating sums of LayerStats.__slots__


class LayerStats:
    """Running sums for one layer while the collector is armed."""

    __slots__ = ("act_sq", "act_abs", "count", "grad_sq", "batches")

    def __init__(self) -> None:
        self.act_sq: torch.Tensor | float = 0.0
        self.act_abs: torch.Tensor | float = 0.0
        self.count = 0
        self.grad_sq: torch.Tensor | float = 0.0
        self.batches = 0


class StatsCollector:
    """Arms forward/backward hooks on ``modules``; :meth:`scores` turns the sums into scores."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.stats = {name: LayerStats() for name in self.modules}
        self._handles: list[RemovableHandle] = []
        self._committed = self._values()  # the sums as of the last commit: discard() returns to them

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self.armed:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(_inputs_require_grad))
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Zero the sums in place (armed hooks hold the same objects, so they keep counting)."""
        for stats in self.stats.values():
            stats.__init__()
        self._committed = self._values()

    def _values(self) -> dict[str, tuple]:
        return {name: tuple(getattr(s, key) for key in LayerStats.__slots__) for name, s in self.stats.items()}

    def commit(self) -> bool:
        """Keep what was added since the last commit (after a successful update), unless it is
        not finite: then roll it back. Returns whether the step's sums were kept."""
        current = self._values()
        changed = [v for name, v in current.items() if any(a is not b for a, b in zip(v, self._committed[name]))]
        if changed:
            sums = [torch.as_tensor(v[i], dtype=torch.float32).reshape(()).cpu() for v in changed for i in SUM_SLOTS]
            if not bool(torch.isfinite(torch.stack(sums)).all()):
                self.discard()
                return False
        self._committed = current
        return True

    def discard(self) -> None:
        """Return the sums to the last commit (a skipped step leaves no trace)."""
        for name, values in self._committed.items():
            for key, value in zip(LayerStats.__slots__, values):
                setattr(self.stats[name], key, value)

    def state_dict(self) -> dict[str, dict[str, float | int]]:
        """The running sums (plain numbers), so a resumed run scores the same window."""
        return {name: {key: float(getattr(s, key)) if key in ("act_sq", "act_abs", "grad_sq") else getattr(s, key)
                       for key in LayerStats.__slots__} for name, s in self.stats.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float | int]]) -> None:
        self.reset()
        for name, values in state.items():
            if name in self.stats:
                for key, value in values.items():
                    setattr(self.stats[name], key, value)
        self._committed = self._values()

    def _forward_hook(self, name: str):
        stats = self.stats[name]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            stats.act_sq = stats.act_sq + flat.square().sum()
            stats.act_abs = stats.act_abs + flat.abs().sum()
            stats.count += flat.numel()
            if output.requires_grad:
                def on_grad(grad: torch.Tensor, flat=flat) -> None:
                    delta = grad.detach().reshape(-1, grad.shape[-1]).float()
                    stats.grad_sq = stats.grad_sq + (delta.T @ flat).square().sum()
                    stats.batches += 1
                output.register_hook(on_grad)
        return hook

    def scores(self) -> dict[str, dict[str, float]]:
        """``{"grad_norm": √(Σ‖δᵀx‖²/batches), "act_rms": √(Σx²/count), "act_mean_abs": Σ|x|/count}``
        per layer (one host sync for all of them)."""
        names = list(self.stats)
        sums = [torch.as_tensor(getattr(s, key), dtype=torch.float32).reshape(())
                for key in ("grad_sq", "act_sq", "act_abs") for s in self.stats.values()]
        device = next((t.device for t in sums if t.device.type != "cpu"), torch.device("cpu"))
        values = torch.stack([t.to(device) for t in sums]).tolist()  # one host sync for all layers
        k = len(names)
        grad, act, act_abs = values[:k], values[k:2 * k], values[2 * k:]
        result = {}
        for i, name in enumerate(names):
            s = self.stats[name]
            result[name] = {"grad_norm": (grad[i] / max(s.batches, 1)) ** 0.5,
                            "act_rms": (act[i] / max(s.count, 1)) ** 0.5,
                            "act_mean_abs": act_abs[i] / max(s.count, 1)}
        return result
