"""Writing files so that a crash never leaves a truncated one: JSON and safetensors, each
written to a temporary name and renamed into place."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch


def atomic_write(path: Path, write) -> None:
    """Write through ``path.tmp`` and rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    seen: dict[tuple[int, int], str] = {}
    plain = {}
    for key, t in tensors.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        plain[key] = t.clone().contiguous() if ident in seen else t.contiguous()  # tied weights: one copy each
        seen[ident] = key
    atomic_write(path, lambda p: save_file({k: v.cpu() for k, v in plain.items()}, p, metadata=metadata))
