"""The checks :class:`~adaptopt.AdaptiveOptimizer` runs on its arguments before it changes anything."""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

import torch

from ..peft_arguments import PEFT_NAMES
from ..policies.base import check_positive_int

TASK_HEADS = ("classifier", "score")
# factors want about ten times the LR of full weights (docs/design.md §4)
LORA_LR_MULTIPLE = 10.0
NONFINITE = ("skip", "raise", "ignore")


def check_adamw_arguments(adamw_kwargs: Mapping[str, Any], own: Sequence[str]) -> None:
    """Refuse keywords that neither AdaptiveOptimizer (``own``) nor AdamW takes, naming both lists."""
    adamw = [n for n in inspect.signature(torch.optim.AdamW).parameters if n not in ("params", "lr")]
    unknown = sorted(set(adamw_kwargs) - set(adamw))
    if unknown:
        raise TypeError(f"AdaptiveOptimizer got unexpected argument(s) {unknown}: its own are {list(own)} "
                        f"(PEFT's names {sorted(PEFT_NAMES)} work too), and it passes {adamw} to AdamW")


def check_arguments(lr: Any, lora_lr: Any, lora_plus_ratio: Any, nonfinite: Any, steps_per_epoch: Any,
                    total_steps: Any, adamw_kwargs: Mapping[str, Any], own: Sequence[str]
                    ) -> tuple[float, float | None]:
    """Validate the optimizer's own arguments (a ``ValueError``/``TypeError`` naming the bad one);
    return ``lora_lr`` (default ``LORA_LR_MULTIPLE × lr``) and ``lora_plus_ratio`` as floats."""
    for label, value in (("lr", lr), ("lora_lr", lora_lr)):
        if value is None and label == "lora_lr":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{label} must be a finite number ≥ 0 (a float, not a string), got {value!r}")
    if lora_plus_ratio is not None and (isinstance(lora_plus_ratio, bool) or not isinstance(
            lora_plus_ratio, (int, float)) or not math.isfinite(lora_plus_ratio) or lora_plus_ratio <= 0):
        raise ValueError(f"lora_plus_ratio must be a finite number > 0 (LoRA+ uses e.g. 16) or None, "
                         f"got {lora_plus_ratio!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    check_positive_int("steps_per_epoch", steps_per_epoch, allow_none=True)
    check_positive_int("total_steps", total_steps, allow_none=True)
    check_adamw_arguments(adamw_kwargs, own)
    return (lr * LORA_LR_MULTIPLE if lora_lr is None else lora_lr), (
        None if lora_plus_ratio is None else float(lora_plus_ratio))


def refuse_deepspeed(model: Any) -> None:
    """DeepSpeed ZeRO owns the parameters (partitioned, ``ds_id``) and fixes the trained set when it
    is initialized, so transitions that change what trains cannot reach it: refused by name, with the
    supported alternatives."""
    if any(hasattr(p, "ds_id") for p in model.parameters()) or type(model).__name__ == "DeepSpeedEngine":
        raise ValueError("AdaptiveOptimizer does not run under DeepSpeed ZeRO: ZeRO partitions the parameters and "
                         "fixes the trained set at initialize(), so a layer's move between frozen, LoRA and full "
                         "cannot reach it. Use FSDP2 (torch.distributed.fsdp.fully_shard; every mode works on sharded "
                         "weights, docs/integrations.md) or DDP (adaptopt.integrations.ddp.AdaptiveDDP) instead")


# the devices torch has a fused AdamW kernel for (torch.optim.Optimizer's own list, read lazily)
def _fused_devices() -> tuple[str, ...]:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices
    return tuple(_get_fused_kernels_supported_devices())


def adamw_kernel(parameters: Sequence[torch.Tensor], adamw_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The AdamW kernel the optimizer runs, unless the user chose one (``fused`` or ``foreach``):
    ``fused=True`` when every parameter is on a device torch has the fused kernel for, else
    ``foreach=True`` (and ``foreach`` when the user turned ``fused`` off).

    Why fused: a FULL layer's update is memory-bound, and the fused kernel reads and writes each
    element once, where ``foreach`` makes a pass over the group per operation. On this CPU it updated
    MiniLM's two FULL blocks (3.55M elements) in 1.0 ms against 8.5 ms (docs/performance.md, row 8d);
    the result agrees to the last bits of float rounding, not bit for bit."""
    kwargs = dict(adamw_kwargs)
    if kwargs.get("fused") is None and kwargs.get("foreach") is None:
        kwargs.pop("fused", None)
        devices = {p.device.type for p in parameters}
        kwargs["fused" if devices and devices <= set(_fused_devices()) else "foreach"] = True
    elif not kwargs.get("fused"):
        kwargs.setdefault("foreach", True)
    return kwargs
