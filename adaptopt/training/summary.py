"""``AdaptiveOptimizer.summary()`` (a plain-text table of every target layer's state) and
``AdaptiveOptimizer.print_trainable_parameters()`` (its last line, PEFT's one-liner)."""
from __future__ import annotations

from typing import Iterable, Mapping

from torch import nn

from ..modes import Mode


def layer_table(model: nn.Module, layers: Mapping[str, nn.Module], lr_scales: Mapping[str, float],
                other_params: Iterable[nn.Parameter]) -> str:
    """Layers × mode / rank / LR scale / trainable parameters, then mode counts and totals."""
    rows = [("layer", "mode", "rank", "lr scale", "trainable")]
    target_total = 0
    for name, module in layers.items():
        count = sum(p.numel() for _, p in module.mode_parameters())
        target_total += count
        rows.append((name, module.mode.value, str(module.rank) if module.mode is Mode.LORA else "-",
                     f"{lr_scales[name]:g}", f"{count:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    other = sum(p.numel() for p in other_params)
    lines += ["-" * len(lines[0]), f"trainable: {target_total:,} in target layers + {other:,} other",
              one_line(model, layers, target_total + other)]
    return "\n".join(lines)


def one_line(model: nn.Module, layers: Mapping[str, nn.Module], trainable: int) -> str:
    """``trainable params: … || all params: … || trainable%: … || layers: f full, l lora, z frozen``."""
    total = sum(p.numel() for p in model.parameters())
    counts = {m: sum(1 for x in layers.values() if x.mode is m) for m in Mode}
    share = 100 * trainable / max(total, 1)
    return (f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
            f" || layers: {counts[Mode.FULL]} full, {counts[Mode.LORA]} lora, {counts[Mode.FROZEN]} frozen")
