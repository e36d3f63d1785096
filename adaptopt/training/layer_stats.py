"""Per-layer statistics gathered by hooks, only on the steps a policy asks for.

While armed, each target layer accumulates (on device, no host sync):

- ``act_sq``, ``act_abs``: ``Σ x²``, ``Σ |x|`` and ``count`` over its inputs →
  ``act_rms = √(Σx² / count)``, ``act_mean_abs = Σ|x| / count``;
- ``grad_sq``: ``‖δᵀx‖²_F``, the squared Frobenius norm of the gradient the *full* weight
  would receive (``δ`` = gradient at the layer output), whatever the layer's mode. This
  makes gradient scores comparable across FROZEN / LORA / FULL (docs/design.md §6). With
  ``gradient="cheap"`` / ``"probed"`` the same quantity is estimated per optimizer step from
  what backward computes anyway (:mod:`adaptopt.training.gradient_probes`) and the GEMM below is not paid.

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

from .gradient_probes import StepGradients


class _Disarm:
    """A handle whose ``remove()`` disarms the step-gradient hooks with the rest."""

    def __init__(self, step_gradients: StepGradients) -> None:
        self.step_gradients = step_gradients

    def remove(self) -> None:
        self.step_gradients.disarm()


def _inputs_require_grad(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a frozen layer below every trainable one gets an input that requires
    grad, so that ``δ`` reaches it on scoring steps (its input is a leaf: nothing upstream trains)."""
    x = args[0]
    if (module.training and torch.is_grad_enabled() and not x.requires_grad
            and not any(p.requires_grad for p in module.parameters())):  # a trainable layer's output has δ anyway
        return (x.detach().requires_grad_(True), *args[1:])
    return None


GRADIENT_SCORES = ("exact", "cheap", "probed", None)
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
    """Arms forward/backward hooks on ``modules``; :meth:`scores` turns the sums into scores.

    ``gradient="exact"`` computes ``‖δᵀx‖_F`` per micro-batch (one weight-gradient-sized GEMM
    per layer); ``"cheap"`` estimates the step's ``‖G‖_F`` from what backward computes anyway
    (:mod:`adaptopt.training.gradient_probes`), fed by :meth:`observe_step`; ``"probed"`` adds random
    probes to LoRA layers' estimates; ``None`` collects no gradient score.
    ``activations=False`` skips the input statistics.
    """

    def __init__(self, modules: Mapping[str, nn.Module], gradient: str | None = "exact",
                 activations: bool = True, frozen_layers: bool = True) -> None:
        if gradient not in GRADIENT_SCORES:
            raise ValueError(f"gradient score must be one of {GRADIENT_SCORES}, got {gradient!r}")
        self.modules = dict(modules)
        self.gradient, self.activations, self.frozen_layers = gradient, activations, frozen_layers
        self.stats = {name: LayerStats() for name in self.modules}
        self.window_seed = 0
        self.step_gradients = (StepGradients(self.modules, probe_lora=gradient == "probed")
                               if gradient in ("cheap", "probed") else None)
        self._handles: list[RemovableHandle] = []
        self._committed = self._values()  # the sums as of the last commit: discard() returns to them

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self.armed:
            return
        for name, module in self.modules.items():
            if not self.frozen_layers and module.mode.value == "frozen":
                continue  # unhooked: a frozen prefix then needs no backward pass at all
            if self.gradient is not None:
                self._handles.append(module.register_forward_pre_hook(_inputs_require_grad))
            if self.activations or self.gradient == "exact":
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        if self.step_gradients is not None:
            self.step_gradients.arm(self.window_seed, {name: s.batches for name, s in self.stats.items()},
                                    skip_frozen=not self.frozen_layers)
            self._handles.append(_Disarm(self.step_gradients))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def observe_step(self) -> None:
        """Cheap mode: add this optimizer step's gradient estimates (call after backward, once
        per step, before the update changes the factors)."""
        if self.step_gradients is None or not self.armed:
            return
        for name, sq in self.step_gradients.take().items():
            stats = self.stats[name]
            stats.grad_sq = stats.grad_sq + sq
            stats.batches += 1

    def reset(self, window_seed: int | None = None) -> None:
        """Zero the sums in place (armed hooks hold the same objects, so they keep counting);
        ``window_seed`` seeds the next window's probes."""
        for stats in self.stats.values():
            stats.__init__()
        if window_seed is not None:
            self.window_seed = int(window_seed)
        self._committed = self._values()

    def _values(self) -> dict[str, tuple]:
        return {name: tuple(getattr(s, key) for key in LayerStats.__slots__) for name, s in self.stats.items()}

    def commit(self) -> bool:
        """Keep what was added since the last commit (after a successful update), unless it is
        not finite: then roll it back. Returns whether the step's sums were kept."""
        if not self.armed:
            return True  # disarmed steps add nothing: skip the per-layer walk on the hot path
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
        if self.step_gradients is not None:
            self.step_gradients.discard()
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
            if self.activations:
                stats.act_sq = stats.act_sq + flat.square().sum()
                stats.act_abs = stats.act_abs + flat.abs().sum()
                stats.count += flat.numel()
            if self.gradient == "exact" and output.requires_grad:
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
        result: dict[str, dict[str, float]] = {}
        for i, name in enumerate(names):  # only what was observed: an unseen layer keeps its old scores
            s, entry = self.stats[name], {}
            if s.batches:
                entry["grad_norm"] = (grad[i] / s.batches) ** 0.5
            if s.count:
                entry.update(act_rms=(act[i] / s.count) ** 0.5, act_mean_abs=act_abs[i] / s.count)
            result[name] = entry
        return result
