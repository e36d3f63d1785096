r"""Base weights sharded by FSDP2 (``fully_shard``): reading, folding into and copying them.

Under FSDP2 a base weight is a ``DTensor`` of global shape ``(m, n)`` whose rows are split over
the ranks of a 1-D mesh (``Shard(0)``, ``torch.chunk`` sizes: rank ``k`` of ``R`` holds rows
``[k·c, min((k+1)·c, m))`` with ``c = ⌈m/R⌉``). LoRA factors are *replicated*: every rank holds
the whole ``A`` and ``B``, started identically and updated with averaged gradients
(:mod:`adaptopt.training.distributed`). So a fold needs no communication (docs/design.md §8):

.. math::  W_{k} \leftarrow W_{k} + s\,B_{k}A,

where ``W_k``, ``B_k`` are rank ``k``'s rows. Only reads of the whole weight (weight scores,
PiSSA's SVD, exports) gather it (``full_tensor``, a collective every rank must join).
torch.distributed is reached through the tensors themselves, so this imports with torch alone.
"""
from __future__ import annotations

from typing import Mapping

import torch


def is_sharded(t: torch.Tensor) -> bool:
    """An FSDP2 ``DTensor`` parameter (duck-typed: torch.distributed may be absent)."""
    return hasattr(t, "full_tensor")


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or a sharded one gathered from every rank (collective)."""
    return t.full_tensor() if is_sharded(t) else t


def local_part(sharded: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (a tensor of ``sharded``'s global shape, the same on every rank) that
    this rank holds of ``sharded``. No communication.

    Raises ``ValueError`` for a sharding other than one mesh dimension with ``Shard(d)`` or
    ``Replicate()`` (2-D meshes, HSDP) — it names the placement."""
    mesh, placements = sharded.device_mesh, tuple(sharded.placements)
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(f"adaptopt folds LoRA factors into weights sharded over a 1-D mesh (fully_shard with one "
                         f"mesh dimension); this weight is placed as {placements} on a {mesh.ndim}-D mesh")
    placement = placements[0]
    if placement.is_replicate():
        return full
    if not placement.is_shard():
        raise ValueError(f"cannot fold into a weight placed as {placement}: only Shard(d) and Replicate() are "
                         "supported")
    dim = placement.dim
    rows = full.shape[dim]
    chunk = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    part = full.narrow(dim, start, min(chunk, rows - start))
    if part.shape != sharded.to_local().shape:
        raise ValueError(f"unexpected sharding: this rank holds {tuple(sharded.to_local().shape)} of "
                         f"{tuple(full.shape)}, not the torch.chunk slice {tuple(part.shape)}")
    return part


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this rank stores of ``t`` (its shard, or ``t`` itself): writing into it under
    ``no_grad`` changes the parameter."""
    return t.to_local() if is_sharded(t) else t


def with_sharding_of(sharded: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """This rank's ``local`` rows as a tensor sharded like ``sharded`` (no communication)."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, sharded.device_mesh, sharded.placements, shape=sharded.shape,
                              stride=sharded.stride())


def shard_like(sharded: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A whole tensor (the same on every rank) as ``sharded``'s layout: this rank's rows of it,
    copied, as a tensor sharded like ``sharded`` (no communication)."""
    return with_sharding_of(sharded, local_part(sharded, full).clone(memory_format=torch.contiguous_format))


def refuse_sharded_4bit(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the 4-bit layers (name → base weight) that ``fully_shard``
    has sharded: it turns bitsandbytes' packed ``Params4bit`` into a plain ``DTensor`` and drops
    the quantization state, so the layer could no longer dequantize its weight."""
    sharded = [name for name, weight in weights.items() if is_sharded(weight)]
    if sharded:
        raise ValueError(
            f"{len(sharded)} 4-bit layers were sharded by fully_shard ({', '.join(sharded[:3])}"
            f"{', ...' if len(sharded) > 3 else ''}): FSDP2 turns bitsandbytes' "
            "packed 4-bit weights into plain DTensors and drops their quantization state. QLoRA under FSDP2 is not "
            "supported; train 4-bit models on one device or with DDP (adaptopt.integrations.ddp.AdaptiveDDP), or "
            "keep the bases in float/bf16 under FSDP2 (LoRA on sharded weights works)")
