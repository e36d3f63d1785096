"""Keeping ranks in agreement under ``torch.distributed`` (DDP through ``torchrun`` / accelerate).

Every rank runs the same :class:`~adaptopt.AdaptiveOptimizer` on its own shard of the batch.
Two things would let ranks drift apart, and both are closed here with plain tensor
collectives (nothing is pickled):

- **scores**: each rank's hooks see only its shard. Before a decision the collector's sums
  (``Σx²``, ``Σ|x|``, ``count``, ``Σ‖δᵀx‖²``, ``batches``) are summed over ranks, so every
  rank scores the layers on the whole global batch;
- **decisions**: whatever a policy computes, rank 0's decisions are broadcast and applied
  everywhere (one ``(layers × 3)`` float64 tensor: mode code, rank, LR scale).

Wrappers that hook parameters when they are built (DDP) must be rebuilt after a transition;
see :class:`adaptopt.integrations.ddp.AdaptiveDDP`.

Under FSDP2 (``fully_shard``) the base weights are sharded and FSDP reduce-scatters their
gradients; LoRA factors started after sharding are plain tensors *replicated* on every rank
(docs/design.md §8). Two more collectives keep them so: a new factor is broadcast from rank 0
when a transition makes it (:func:`broadcast_parameters`), and every replicated trainable
parameter's gradient is averaged over the ranks as soon as backward has accumulated it
(:class:`ReplicatedGradients`), so clipping, scores and AdamW all see the global gradient.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..modes import Mode
from ..policies import LayerDecision
from .layer_stats import LayerStats, StatsCollector

MODE_CODES = {mode: float(i) for i, mode in enumerate(Mode)}
ABSENT = -1.0


def active_group(process_group: Any = None) -> Any | None:
    """The process group to agree over, or ``None`` when running in a single process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _comm_device(group: Any) -> torch.device:
    """NCCL communicates CUDA tensors only; gloo (CPU) takes host tensors."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_stats(collector: StatsCollector, group: Any) -> None:
    """Sum every layer's running sums over the ranks of ``group``, in place."""
    fields = LayerStats.__slots__
    rows = [[torch.as_tensor(getattr(s, f), dtype=torch.float64).reshape(()).cpu() for f in fields]
            for s in collector.stats.values()]
    table = torch.stack([torch.stack(r) for r in rows]).to(_comm_device(group))
    torch.distributed.all_reduce(table, group=group)
    for stats, row in zip(collector.stats.values(), table.cpu().tolist()):
        for field, value in zip(fields, row):
            setattr(stats, field, int(round(value)) if field in ("count", "batches") else value)


def broadcast_decisions(decisions: Mapping[str, LayerDecision], layer_names: Sequence[str],
                        group: Any, src: int = 0) -> dict[str, LayerDecision]:
    """Rank ``src``'s decisions, on every rank of ``group``.

    Encoded per layer as ``(mode code | -1, rank | 0, lr_scale | NaN)``; layers absent from
    the decisions stay absent.
    """
    modes = list(Mode)
    table = torch.full((len(layer_names), 3), ABSENT, dtype=torch.float64)
    for i, name in enumerate(layer_names):
        d = decisions.get(name)
        if d is not None:
            table[i] = torch.tensor([MODE_CODES[d.mode], float(d.rank or 0),
                                     math.nan if d.lr_scale is None else float(d.lr_scale)], dtype=torch.float64)
    table = table.to(_comm_device(group))
    torch.distributed.broadcast(table, src=torch.distributed.get_global_rank(group, src), group=group)
    agreed = {}
    for name, (code, rank, scale) in zip(layer_names, table.cpu().tolist()):
        if code != ABSENT:
            agreed[name] = LayerDecision(modes[int(code)], int(rank) or None,
                                         None if math.isnan(scale) else scale)
    return agreed


def all_ranks_agree(flag: bool, group: Any) -> bool:
    """``flag`` on every rank of ``group`` (a logical AND over the ranks)."""
    value = torch.tensor([1.0 if flag else 0.0], device=_comm_device(group))
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(value.item() == 1.0)


def broadcast_parameters(params: Iterable[torch.Tensor], group: Any, src: int = 0) -> None:
    """Overwrite ``params`` on every rank of ``group`` with rank ``src``'s values, in place."""
    device = _comm_device(group)
    with torch.no_grad():
        for p in params:
            buffer = p.detach().to(device)
            torch.distributed.broadcast(buffer, src=torch.distributed.get_global_rank(group, src), group=group)
            p.copy_(buffer)


def _average_gradient(p: torch.Tensor, group: Any) -> None:
    buffer = p.grad.to(_comm_device(group))
    torch.distributed.all_reduce(buffer, group=group)
    p.grad.copy_(buffer.div_(torch.distributed.get_world_size(group)))


class ReplicatedGradients:
    """Average the gradients of replicated parameters over a group, each as soon as backward
    has accumulated it (``register_post_accumulate_grad_hook``): ``g ← (1/R) Σ_ranks g``, the
    mean FSDP2 gives its sharded weights. Ranks run the same graph, so the hooks fire, and
    the all-reduces run, in the same order everywhere. With gradient accumulation each
    micro-batch averages the running sum; what earlier micro-batches added is already equal
    on every rank, so the result is the same mean."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def watch(self, params: Iterable[torch.Tensor], group: Any) -> None:
        """Average exactly these parameters' gradients from now on (replacing earlier ones)."""
        self.clear()
        self._handles = [p.register_post_accumulate_grad_hook(partial(_average_gradient, group=group))
                         for p in params]

    def clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
