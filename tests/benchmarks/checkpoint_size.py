"""How big is what the Trainer writes? SmolLM2-135M, all-LoRA and Hybrid(), checkpoint / base model.

    .venv/bin/python tests/benchmarks/checkpoint_size.py        (~2 min)

Loads SmolLM2-135M from its converted folder (so unchanged base weights can be re-read from it),
trains a few steps (Hybrid decides after 2), saves the plain folder + sidecar exactly as a Trainer
checkpoint does (``save_plainly(model).save_pretrained``), and prints each file's size against the
base model's ``model.safetensors``; for comparison, the size of the earlier format (the model's
whole ``state_dict()``: the plain copy beside the exact base weight and factors).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from adaptopt import AdaptiveOptimizer, Hybrid
    from adaptopt.cli.models import model_directory
    from adaptopt.formats.hf_folders import SIDECAR, save_plainly
    base = model_directory({"name": "smollm2-135m"})
    base_size = os.path.getsize(base / "model.safetensors")
    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    print(f"base model.safetensors: {base_size / 1e6:.0f} MB")
    for label, policy in (("all-LoRA r=16", "lora"), ("Hybrid()", Hybrid(calibration_steps=2))):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base)
        opt = AdaptiveOptimizer(model, lr=1e-4, policy=policy, rank=16, alpha=32, total_steps=10)
        for _ in range(3):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        with tempfile.TemporaryDirectory() as folder:
            save_plainly(model).save_pretrained(folder)
            plain = os.path.getsize(Path(folder) / "model.safetensors")
            sidecar = os.path.getsize(Path(folder) / SIDECAR)
            earlier = Path(folder) / "earlier.safetensors"
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
            save_file(state, str(earlier))
            old = os.path.getsize(earlier)
        modes = {m: sum(layer.mode.value == m for layer in opt.layers.values()) for m in ("full", "lora", "frozen")}
        print(f"{label} ({modes}): plain {plain / 1e6:.0f} MB ({plain / base_size:.3f}× base) + sidecar "
              f"{sidecar / 1e6:.1f} MB = {(plain + sidecar) / base_size:.3f}× base; the earlier format "
              f"{old / 1e6:.0f} MB ({old / base_size:.3f}× base)")


if __name__ == "__main__":
    main()
