"""Giving back the memory of a weight read from a memory-mapped file once it is quantized.

``from_pretrained`` maps a safetensors file into memory (one private, file-backed mapping for the
whole file) and the weights are views into it. Quantizing a layer reads its fp32 weight, so its
pages become resident; dropping the fp32 tensor afterwards does not unmap them, because the
embeddings and norms still view the same mapping. Measured on SmolLM2-135M: ~400 MB of resident
file pages stayed behind after every linear layer was quantized to NF4, and QLoRA peaked above
LoRA (docs/design.md §3).

:func:`release_file_pages` asks the kernel to reclaim exactly the whole pages a tensor spans
(``madvise(MADV_PAGEOUT)``, Linux ≥ 5.4). This never changes data: a clean file page is dropped
and read back from the file if it is touched again; a page the process has written is kept or
swapped, never discarded. So it is safe even if the tensor were still in use (it would only be
slower). Only tensors on the CPU that lie inside a file-backed mapping are released; anywhere
else (other systems, anonymous memory) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

MADV_PAGEOUT = 21  # <linux/mman.h>


def _file_backed(start: int, end: int) -> bool:
    """Does ``[start, end)`` lie inside one mapping of a regular file (``/proc/self/maps``)?"""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= start and end <= high:
                return len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0"
    return False


def release_file_pages(tensor: torch.Tensor) -> int:
    """Ask the kernel to reclaim the whole pages of ``tensor``'s data if they belong to a mapped
    file; returns the bytes asked for (0 when nothing applies or the call is refused)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size()
    start, end = -(-first // page) * page, last // page * page  # whole pages only: neighbours untouched
    if end <= start or not _file_backed(start, end):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    refused = libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)
    return 0 if refused else end - start
