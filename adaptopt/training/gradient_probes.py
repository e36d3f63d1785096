r"""Cheap gradient importance: ``‖G‖_F`` of each layer's full-weight gradient ``G = Σ_b δ_bᵀx_b``
over one optimizer step, estimated from what backward computes anyway (docs/design.md §6).

- **FULL** layer: its weight (4-bit: the dense delta) receives ``G`` itself: exact.
- **FROZEN** layer: nothing is computed for it, so ``k`` random probes are: ``‖G Z‖²_F`` with
  ``Z ∈ R^{in×k}``, entries ``N(0, 1/k)``, has expectation ``‖G‖²_F``; it costs
  ``O(N(in+out)k)`` instead of the ``O(N·in·out)`` of ``G`` (``δ`` must still reach the layer,
  as for the exact score). New probes are drawn every step, so a window of ``w`` steps looks
  in ``w·k`` directions.
- **LORA** layer: ``∂L/∂B = s·G·Aᵀ``, the full gradient seen through ``A``'s ``r`` rows. For
  ``A`` with isotropic random rows (a fresh Kaiming ``A``), ``E‖G Aᵀ‖²_F = ‖G‖²_F·‖A‖²_F/in``,
  so ``ĝ_B² = ‖∂B‖²_F / s² · in / ‖A‖²_F`` is unbiased while ``A`` is near its random start.
  Its ``r`` directions stay the same all window long, so alone it is noisy while ``A`` is
  fresh (measured on MiniLM, ``tests/benchmarks/cheap_scores.py``: block rankings off in the
  first window, close to exact later). With ``probe_lora=True`` (AutoMode's ``score="probed"``)
  the layer is also probed, and the two estimates are averaged in proportion to their
  directions — at the price of two skinny GEMMs per layer and scored step (~9% of a MiniLM step):

  .. math::  \hat g^2 = \frac{r\,\hat g_B^2 + k\,\lVert G Z\rVert_F^2}{r + k}

  Once ``A`` has trained, its rows lean toward the directions the gradient has taken most, so
  ``ĝ_B`` reads high for layers whose gradient keeps one direction (a bias toward promoting
  them); the probe half has no such bias.

Each sum is over the micro-batches of one optimizer step *before* the norm (the step's own
gradient), read from per-micro-batch hooks on the trained tensors, so gradient clipping (which
scales only what the optimizer sees) does not enter. Under FSDP2 (``group`` set) the estimates
are those of one process on the global batch: a sharded weight's gradient is read once FSDP has
reduce-scattered it (``‖G‖² = Σ_ranks ‖G_rank‖²``), and the other sums (``∂B``, ``δᵀ(xZ)``,
the same probes on every rank) are averaged over the ranks before their norms are taken.
FULL layers keep a weight-sized sum for this, LoRA layers a ``B``-sized one, frozen layers
``out × k``. Probe matrices are drawn from a private generator seeded by (window, layer, step
in window): a resumed run draws the same ones.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..layers.sharded import is_sharded, local_tensor

PROBES = 16


def _trained(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return module.mode_parameters() if hasattr(module, "mode_parameters") else []


class StepGradients:
    """Per-layer sums of one step's gradient evidence; :meth:`take` turns them into ``ĝ²``."""

    def __init__(self, modules: Mapping[str, nn.Module], probe_lora: bool = False) -> None:
        self.modules = dict(modules)
        self.probe_lora = probe_lora
        self.index = {name: i for i, name in enumerate(self.modules)}
        self.sums: dict[str, torch.Tensor] = {}  # FULL: the weight's gradient; LORA: B's
        self.probe_sums: dict[str, torch.Tensor] = {}  # FROZEN and LORA: δᵀ(xZ)
        self.seed = 0
        self.draw: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._handles: list[RemovableHandle] = []
        self.group = None  # FSDP2's process group: estimates of the global batch (see above)
        self.sharded_sums: set[str] = set()  # layers whose sum is this rank's shard of a reduced gradient

    def arm(self, seed: int, draws: Mapping[str, int], skip_frozen: bool = False) -> None:
        """Hook every layer as its current mode needs (call again after a transition). Probes
        are seeded by ``seed`` (the window), the layer and ``draws[layer]`` (steps it has been
        scored in this window), so a resumed run draws the same probes."""
        self.disarm()
        self.seed = seed
        self.draw = {name: int(draws.get(name, 0)) for name in self.modules}
        for name, module in self.modules.items():
            trained = dict(_trained(module))
            kind = module.mode.value
            if kind == "full":
                weight = trained.get("delta", trained.get("base.weight"))
                if weight is not None and is_sharded(weight):  # FSDP2 reduces it outside autograd
                    self._handles.append(weight.register_post_accumulate_grad_hook(self._keep_shard(name)))
                elif weight is not None:
                    self._handles.append(weight.register_hook(self._accumulate(name)))
            elif kind == "lora":
                self._handles.append(module.lora_B.register_hook(self._accumulate(name)))
                if self.probe_lora:
                    self._handles.append(module.register_forward_hook(self._probe_hook(name)))
            elif not skip_frozen:
                self._handles.append(module.register_forward_hook(self._probe_hook(name)))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.discard()

    def _accumulate(self, name: str):
        def hook(grad: torch.Tensor) -> None:  # a Conv1D weight is (in, out): the norm is the same
            g = grad.detach().float()
            self.sums[name] = g if name not in self.sums else self.sums[name] + g
        return hook

    def _keep_shard(self, name: str):
        def hook(param: torch.Tensor) -> None:  # .grad already sums this step's micro-batches
            self.sums[name] = local_tensor(param.grad).detach().float().clone()
            self.sharded_sums.add(name)
        return hook

    def _probes(self, name: str, in_features: int, device: torch.device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.index[name] * 7919 + self.draw[name]) % (2 ** 63))
        return (torch.randn(in_features, PROBES, generator=generator) / math.sqrt(PROBES)).to(device)

    def _probe_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach()
            xz = x.reshape(-1, x.shape[-1]).float() @ self._probes(name, x.shape[-1], x.device)

            def on_grad(grad: torch.Tensor) -> None:
                g = grad.detach().reshape(-1, grad.shape[-1]).float().T @ xz
                self.probe_sums[name] = g if name not in self.probe_sums else self.probe_sums[name] + g
            output.register_hook(on_grad)
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """``{layer: ĝ²}`` for the step just finished (layers that saw no gradient are left out);
        the sums are cleared and the next step draws new probes."""
        estimates = {}
        names = sorted(set(self.sums) | set(self.probe_sums), key=self.index.__getitem__)
        shard_sq = self._reduce_over_ranks(names) if self.group is not None else {}
        for name in names:
            module = self.modules[name]
            probed = self.probe_sums[name].square().sum() if name in self.probe_sums else None
            if name in shard_sq:
                estimates[name] = shard_sq[name]
            elif name not in self.sums:
                estimates[name] = probed
            elif module.mode.value == "lora":
                a = module.lora_A.detach().float()
                through_a = (self.sums[name].square().sum() * (module.in_features / a.square().sum().clamp_min(1e-30))
                             / module.scaling ** 2)
                r = a.shape[0]
                estimates[name] = through_a if probed is None else (r * through_a + PROBES * probed) / (r + PROBES)
            else:
                estimates[name] = self.sums[name].square().sum()
            self.draw[name] += 1
        self.discard()
        return estimates

    def _reduce_over_ranks(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Average the replicated sums over ``group`` in place; return ``‖G‖²`` of the sharded ones
        (their shards' squared norms summed over the ranks). Two collectives, same order everywhere."""
        import torch.distributed as dist
        sharded = [n for n in names if n in self.sharded_sums and n in self.sums]
        averaged = [(table, n) for n in names for table in (self.sums, self.probe_sums)
                    if n in table and not (table is self.sums and n in self.sharded_sums)]
        if averaged:
            flat = torch.cat([table[n].reshape(-1) for table, n in averaged])
            dist.all_reduce(flat, group=self.group)
            flat /= dist.get_world_size(self.group)
            for (table, n), part in zip(averaged, flat.split([table[n].numel() for table, n in averaged])):
                table[n] = part.view_as(table[n])
        if not sharded:
            return {}
        squares = torch.stack([self.sums[n].square().sum() for n in sharded])
        dist.all_reduce(squares, group=self.group)
        return dict(zip(sharded, squares))

    def discard(self) -> None:
        self.sums.clear()
        self.probe_sums.clear()
        self.sharded_sums.clear()
