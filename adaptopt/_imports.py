"""Optional dependencies: the one place that checks for them.

The core needs only torch (+ safetensors for checkpoints). Everything else is imported
at the point of use through :func:`require`, which names the extra to install.
"""
from __future__ import annotations

import importlib
from importlib.util import find_spec
from types import ModuleType

EXTRA_OF = {"bitsandbytes": "quant", "transformers": "hf", "datasets": "hf", "matplotlib": "plot",
            "yaml": "hf", "tqdm": "hf"}


def available(module: str) -> bool:
    """True if ``module`` can be imported (without importing it)."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, *, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that says exactly what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = extra or EXTRA_OF.get(module)
        hint = f"pip install 'adaptopt[{extra}]'" if extra else f"pip install {module}"
        raise ImportError(f"{module} is needed for this feature but is not installed: {hint}") from exc
