"""The three save formats, each loaded back and checked against the trained model's logits.

    python examples/save_load_export.py [output_dir]

1. save_adapters / load_adapters: adaptopt's own, only what changed from the base model;
2. export_merged: a plain transformers model directory (no adaptopt needed to load it);
3. export_peft: a PEFT LoRA adapter (per-layer ranks in rank_pattern), here trained with
   RankAllocation so the ranks differ per layer; the trained head kept under modules_to_save.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from synthetic_task import make_task, tiny_bert
from transformers import AutoModelForSequenceClassification

from adaptopt import AdaptiveOptimizer, export_merged, export_peft, load_adapters, save_adapters


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def main(output_dir: str | None = None, steps: int = 60) -> dict[str, float]:
    out = Path(output_dir or tempfile.mkdtemp(prefix="adaptopt-save-"))
    tiny_bert(seed=0).save_pretrained(out / "base")  # stands in for a hub checkpoint
    model = AutoModelForSequenceClassification.from_pretrained(out / "base")
    opt = AdaptiveOptimizer(model, lr=1e-3, lora_lr=3e-3, policy={"method": "rank_allocation",
                                                                   "strategy": "linear_decay", "budget": 8})
    generator = torch.Generator().manual_seed(0)
    tokens, labels = make_task(1024, generator)
    for _ in range(steps):
        batch = torch.randint(0, len(tokens), (32,), generator=generator)
        model(input_ids=tokens[batch], labels=labels[batch]).loss.backward()
        opt.step()
        opt.zero_grad()
    probe = tokens[:64]
    reference = logits(model, probe)
    print("ranks:", sorted({m.rank for m in opt.layers.values()}))

    save_adapters(model, out / "adapters")
    restored = AutoModelForSequenceClassification.from_pretrained(out / "base")
    load_adapters(restored, out / "adapters")
    gaps = {"adapters": (logits(restored, probe) - reference).abs().max().item()}

    export_merged(model, out / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    gaps["merged"] = (logits(merged, probe) - reference).abs().max().item()

    export_peft(model, out / "peft", modules_to_save=True)  # the trained classifier rides along, for PEFT
    try:
        from peft import PeftModel
    except ImportError:
        print("peft is not installed: skipping the PEFT load check")
    else:
        base = AutoModelForSequenceClassification.from_pretrained(out / "base")
        gaps["peft"] = (logits(PeftModel.from_pretrained(base, out / "peft"), probe) - reference).abs().max().item()
    for name, gap in gaps.items():
        print(f"{name:9s} max |logit difference| vs the trained model: {gap:.1e}  ({out / name})")
    return gaps


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
