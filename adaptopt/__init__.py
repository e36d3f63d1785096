"""adaptopt: layer-wise adaptive fine-tuning for PyTorch.

Every target layer of a model is, at any moment, frozen, LoRA-adapted at some rank, or
fully trained; the library moves layers between these modes while training runs,
without changing what the model computes at the moment of the switch.

The core imports with torch alone; bitsandbytes, transformers, datasets and matplotlib
are imported only by the features that need them. The parts (docs/architecture.md):
``layers`` (the modules and their arithmetic), ``surgery`` (putting them into a model and
taking them out), ``policies`` and ``scores`` (decisions), ``training`` (the optimizer),
``formats`` (files), ``cli`` (the ``adaptopt`` command); ``adaptopt.integrations`` holds the
framework adapters (Trainer, Lightning, DDP).
"""
from ._imports import quiet_optional_kernel_notice
from .formats.checkpoint import load_adapters, save_adapters
from .formats.export import export_merged, export_peft
from .layers.factors import lora_scaling
from .layers.lora import LoRALinear
from .layers.quant import QuantConfig, QuantLoRALinear
from .modes import Mode
from .policies import (
    DEFAULT_POLICY,
    LISA,
    POLICIES,
    ALoRS,
    AutoMode,
    BAdam,
    BitFit,
    Fixed,
    Frozen,
    Full,
    Hybrid,
    LayerDecision,
    LayerView,
    LayerwiseLR,
    LoRA,
    Policy,
    QLoRA,
    RankAllocation,
    Scheduled,
    Spectrum,
    TopK,
    build_policy,
    register_policy,
)
from .surgery.inject import ARCHITECTURE_TARGETS, TargetInfo, find_adapters, inject_adapters, select_targets
from .surgery.unload import disable_adapters, merge_and_unload
from .training.budget import MemoryBudget
from .training.compute import ComputeEstimate, estimate_compute
from .training.estimate import MemoryEstimate, estimate_memory
from .training.optimizer import AdaptiveOptimizer

__version__ = "0.1.0"

quiet_optional_kernel_notice()

__all__ = [
    "ALoRS",
    "ARCHITECTURE_TARGETS",
    "AutoMode",
    "BAdam",
    "BitFit",
    "DEFAULT_POLICY",
    "LayerwiseLR",
    "LISA",
    "QLoRA",
    "RankAllocation",
    "Spectrum",
    "TopK",
    "Scheduled",
    "AdaptiveOptimizer",
    "Fixed",
    "Frozen",
    "Full",
    "Hybrid",
    "LayerDecision",
    "LayerView",
    "LoRA",
    "POLICIES",
    "Policy",
    "build_policy",
    "register_policy",
    "LoRALinear",
    "Mode",
    "QuantConfig",
    "QuantLoRALinear",
    "TargetInfo",
    "export_merged",
    "export_peft",
    "find_adapters",
    "load_adapters",
    "save_adapters",
    "inject_adapters",
    "lora_scaling",
    "disable_adapters",
    "estimate_memory",
    "estimate_compute",
    "ComputeEstimate",
    "MemoryEstimate",
    "MemoryBudget",
    "merge_and_unload",
    "select_targets",
]
