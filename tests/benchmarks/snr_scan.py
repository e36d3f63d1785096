"""Spectrum SNR scan: adaptopt's singular values vs the reference (one fp32 ``svdvals`` per matrix).

    .venv/bin/python tests/benchmarks/snr_scan.py [--models smollm2-135m,minilm] [--repeats 5]

Two weight sets per model: the LoRA targets (what ``adaptopt scan`` and the Spectrum policy
score), and every weight the way ``spectrum.py`` walks them (1-D weights as 1 × n rows, the
tied ``lm_head`` / ``embed_tokens`` under both names). The reference computes each matrix's
singular values with ``torch.linalg.svdvals`` in fp32, one at a time, at the process's
default threads; adaptopt uses ``singular_values`` (float64 Gram eigenvalues, tied tensors
once, two matrices at a time). Both then compute the same ``compat`` SNR. Reference and
candidate alternate repeat by repeat; the ratio of medians is printed, with whether the
per-type rankings are identical (compat and mp) and the largest singular-value gap of each
route against float64 ``svdvals``.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from interleave import interleaved_medians  # noqa: E402

from adaptopt.scores import singular_values, spectrum_snr  # noqa: E402
from adaptopt.surgery.inject import select_targets  # noqa: E402


def load(name: str) -> torch.nn.Module:
    from adaptopt.cli.models import load_model
    model, _ = load_model({"name": name}, "causal_lm" if name.startswith("smollm") else "base")
    return model


def target_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().float() for name in select_targets(model)}


def spectrum_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every ``*.weight`` as ``spectrum.py`` scans it (tied weights appear under each name)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.endswith("weight") and p.dim() in (1, 2):
            out[name] = p.detach().float().reshape(1, -1) if p.dim() == 1 else p.detach().float()
    return out


def layer_type(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def rankings(weights: dict[str, torch.Tensor], spectra: dict[str, torch.Tensor], mode: str) -> dict[str, list[str]]:
    snr = spectrum_snr(weights, mode, spectra)
    groups: dict[str, list[str]] = {}
    for name in weights:
        groups.setdefault(layer_type(name), []).append(name)
    return {t: sorted(names, key=lambda n: -snr[n]["snr"]) for t, names in groups.items()}


def reference_spectra(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``spectrum.py``'s way: one fp32 ``svdvals`` per name, tied or not."""
    return {name: torch.linalg.svdvals(w.float()) for name, w in weights.items()}


def timed(weights, spectra) -> float:
    start = time.perf_counter()
    spectrum_snr(weights, "compat", spectra(weights))
    return time.perf_counter() - start


def compare(label: str, weights: dict[str, torch.Tensor], repeats: int) -> None:
    timed(weights, singular_values)  # warm-up (thread pool, allocator)
    median = interleaved_medians({"reference": functools.partial(timed, weights, reference_spectra),
                                  "ours": functools.partial(timed, weights, singular_values)}, repeats)
    ref_spectra = reference_spectra(weights)
    our_spectra = singular_values(weights)
    same = {mode: rankings(weights, ref_spectra, mode) == rankings(weights, our_spectra, mode)
            for mode in ("compat", "mp")}
    gap = {"svd": 0.0, "gram": 0.0}
    for name, w in weights.items():
        exact = torch.linalg.svdvals(w.double())
        top = float(exact[0]) or 1.0
        gap["svd"] = max(gap["svd"], float((ref_spectra[name].double() - exact).abs().max()) / top)
        gap["gram"] = max(gap["gram"], float((our_spectra[name].double() - exact).abs().max()) / top)
    ref_t, our_t = median["reference"], median["ours"]
    print(f"{label}: {len(weights)} matrices ({len({w.untyped_storage().data_ptr() for w in weights.values()})} "
          f"distinct), {repeats} interleaved repeats")
    print(f"  reference (fp32 svdvals, one at a time)  median {ref_t:7.2f} s")
    print(f"  adaptopt  (fp64 Gram eigvalsh, 2 at once) median {our_t:7.2f} s")
    print(f"  speed-up = {ref_t / our_t:.2f}x   identical per-type ranking: compat {same['compat']}, mp {same['mp']}"
          f"   max |S - S_fp64| / S_max: reference {gap['svd']:.1e}, adaptopt {gap['gram']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,minilm")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        model = load(name)
        compare(f"{name} targets", target_weights(model), args.repeats)
        compare(f"{name} every weight (spectrum.py's walk)", spectrum_weights(model), args.repeats)
        del model


if __name__ == "__main__":
    main()
