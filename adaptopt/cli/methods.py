"""A method section of a run config → ``AdaptiveOptimizer`` keyword arguments (policy included).

The methods framework's keys map as follows: ``lora.{r, alpha, dropout, target_modules}`` → ``rank``,
``alpha``, ``dropout``, ``targets``; ``lora.bias: all | lora_only`` → biases train too;
``quantization.*`` → ``quantize`` (4 bits only); ``spectrum.snr_threshold = p`` → Spectrum
``top_percent = (1 − p)·100``; ``spectrum.layers_to_finetune: [i, j]`` → those blocks FULL,
the rest FROZEN. ``full`` trains every parameter (embeddings too); other methods train the
task head plus what their policy chooses (``training.train_other: true`` adds the rest;
``trainable: [patterns]``, in ``training`` or a method, adds the parameters those name). A
section named after the method holds the policy's own arguments (``automode: {u: 6, t: 10}``).
``memory_budget`` (a method's, else ``training``'s) is the optimizer's, its activations those of a
``batch_size × max_length`` step; a method's ``train_embeddings: true | false | output | output_lora``
is the optimizer's.
"""
from __future__ import annotations

from typing import Any, Mapping

from adaptopt.surgery.inject import DEFAULT_RANK
from adaptopt.training.arguments import LORA_LR_MULTIPLE

from .config import ConfigError


def quantize_config(section: Mapping[str, Any] | None, where: str) -> dict[str, Any] | None:
    if not section:
        return None
    import torch
    bits = section.get("bits", 4)
    if bits != 4:
        raise ConfigError(f"{where}.quantization.bits: only 4-bit bases are supported (NF4 / FP4), got {bits!r}")
    dtype_name = section.get("bnb_4bit_compute_dtype")
    dtype = None
    if dtype_name is not None:
        dtype = getattr(torch, str(dtype_name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"{where}.quantization.bnb_4bit_compute_dtype: expected float32, bfloat16 or "
                              f"float16, got {dtype_name!r}")
    return {"quant_type": str(section.get("bnb_4bit_quant_type", "nf4")), "compute_dtype": dtype,
            "double_quant": bool(section.get("bnb_4bit_use_double_quant", False)),
            "blocksize": int(section.get("blocksize", 64))}


def policy_for(method_cfg: Mapping[str, Any], rank: int, where: str) -> Any:
    """The ``policy=`` argument for ``AdaptiveOptimizer``."""
    method = method_cfg["method"]
    own = dict(method_cfg.get(method) or {}) if method not in ("lora", "spectrum") else {}
    if method in ("lora", "qlora"):
        return {"method": method, "rank": rank, **own}
    if method == "spectrum":
        section = dict(method_cfg.get("spectrum") or {})
        layers = section.pop("layers_to_finetune", "auto")
        threshold = section.pop("snr_threshold", None)
        if threshold is not None:
            if not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
                raise ConfigError(f"{where}.spectrum.snr_threshold: expected a percentile in [0, 1), got {threshold!r}")
            section.setdefault("top_percent", (1 - threshold) * 100)
        if layers != "auto":
            if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
                raise ConfigError(f"{where}.spectrum.layers_to_finetune: expected 'auto' or a list of block "
                                  f"indices, got {layers!r}")
            return {"method": "fixed", "assignment": {rf"\w+(\.\w+)*\.{i}\..*": "full" for i in layers},
                    "default": "frozen"}
        return {"method": "spectrum", **section}
    if method in ("automode", "hybrid"):
        own.setdefault("rank", rank)
    return {"method": method, **own}


def optimizer_kwargs(method_cfg: Mapping[str, Any], training: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Everything ``AdaptiveOptimizer(model, **kwargs)`` needs for this method."""
    lora = dict(method_cfg.get("lora") or {})
    rank = int(lora.get("r", DEFAULT_RANK))
    trainable = ["classifier", "score", *(method_cfg.get("trainable") or training.get("trainable") or ())]
    bias = lora.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"{where}.lora.bias: expected none, all or lora_only, got {bias!r}")
    if bias != "none":
        trainable.append("bias")
    lr = float(method_cfg.get("lr") or training["lr"])
    lora_lr = method_cfg.get("lora_lr") or training.get("lora_lr")
    kwargs: dict[str, Any] = {
        "lr": lr, "lora_lr": float(lora_lr) if lora_lr else lr * LORA_LR_MULTIPLE,
        "rank": rank, "alpha": float(lora.get("alpha", 2 * rank)), "dropout": float(lora.get("dropout", 0.0)),
        "rslora": bool(lora.get("rslora", False)), "weight_decay": float(training.get("weight_decay", 0.0)),
        # full fine-tuning means every parameter, embeddings included (as in the published Full-FT baselines)
        "train_other": bool(method_cfg.get("train_other", training.get("train_other", False)))
        or method_cfg["method"] == "full",
        "trainable": tuple(trainable),
        "policy": policy_for(method_cfg, rank, where),
    }
    if lora.get("target_modules"):
        kwargs["targets"] = list(lora["target_modules"])
    if method_cfg.get("train_embeddings") is not None:
        kwargs["train_embeddings"] = method_cfg["train_embeddings"]
    budget = method_cfg.get("memory_budget", training.get("memory_budget"))
    if budget is not None:  # the run's own step counts: its batch at the longest sequence it allows
        from adaptopt import MemoryBudget
        kwargs["memory_budget"] = MemoryBudget(budget, int(training["batch_size"]), int(training["max_length"]))
    quant = quantize_config(method_cfg.get("quantization"), where)
    if quant is not None and method_cfg["method"] in ("qlora", "alors"):
        kwargs["quantize"] = quant
    return kwargs
