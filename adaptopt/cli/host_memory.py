r"""Training processes on CPU keep the memory they free (glibc's ``malloc``), as PyTorch's caching
allocator does for a GPU's.

A training step frees and allocates the same large buffers every step: a language model's
vocabulary-sized logits, their log-softmax and gradients (``batch × seq × vocab`` floats, 100 MB
each for SmolLM2 at 8 × 64), FULL layers' gradients (set to ``None`` between steps). glibc serves a
block over its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on ``free``, and
returns the top of its heap to the kernel once more than ``M_TRIM_THRESHOLD`` is free there, so the
next step touches those pages afresh: a page fault and a page of zeros per 4 KiB. Measured on the
suite's chitchat task (SmolLM2, 40 steps): 6.3M minor faults in LoRA's run and 6.6M in the default's,
against 0.8M and 0.9M with the memory kept (docs/performance.md, row 8d).

:func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (every block from the heap) and
``M_TRIM_THRESHOLD`` to its largest value (the heap is never trimmed) with ``mallopt``. The cost:
the process keeps its high-water mark, and its peak resident memory can be higher than with the
system's settings (fragments of the heap that a fresh ``mmap`` would not have held). Every CLI
training run calls it (its result row says ``host_malloc``); ``ADAPTOPT_HOST_MALLOC=system`` or the
user's own ``GLIBC_TUNABLES`` malloc settings leave glibc's defaults alone. A raw loop gets the same
by starting Python with
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
OPT_OUT = "ADAPTOPT_HOST_MALLOC"


def keep_freed_memory() -> str:
    """Keep freed memory in this process (the module docstring); returns ``"kept"``, or why not:
    ``"system"`` (opted out: :data:`OPT_OUT` or the user's ``GLIBC_TUNABLES``) or ``"not glibc"``."""
    if os.environ.get(OPT_OUT, "").lower() == "system" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "system"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return "not glibc"
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that does nothing
        return "not glibc"
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "not glibc"
    return "kept"
