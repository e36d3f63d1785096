"""Optional dependencies: the one place that checks for them.

The core needs only torch (+ safetensors for checkpoints). Everything else is imported
at the point of use through :func:`require`, which names the extra to install.
"""
from __future__ import annotations

import importlib
import logging
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


# bitsandbytes looks for an optional CPU kernel from the "kernels-community" hub repository in every
# process that imports transformers' Trainer. Without it bitsandbytes says it failed to load the
# kernel; in offline mode (HF_HUB_OFFLINE, as the CLI runs) the "kernels" package adds that it
# skips the repository's publisher check. Either way bitsandbytes uses its own CPU path: not news
# to a user who did nothing wrong, so both lines are shown only when bitsandbytes logs at DEBUG.
KERNEL_NOTICES = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
                  ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"))


class _OptionalKernelNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return (not record.getMessage().startswith(self.prefix)
                or logging.getLogger("bitsandbytes").isEnabledFor(logging.DEBUG))


def quiet_optional_kernel_notice() -> None:
    """Hide the optional-kernel notices above (idempotent)."""
    for name, prefix in KERNEL_NOTICES:
        target = logging.getLogger(name)
        if not any(isinstance(f, _OptionalKernelNotice) for f in target.filters):
            target.addFilter(_OptionalKernelNotice(prefix))
