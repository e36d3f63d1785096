"""Releasing the resident pages of a weight read from a memory-mapped file (adaptopt/layers/mapped_pages.py)."""
from __future__ import annotations

import sys

import pytest
import torch

from adaptopt.layers.mapped_pages import release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
ROWS, COLS = 16 * 1024, 1024  # 64 MiB of float32


def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def _mapped(path) -> torch.Tensor:
    """A float32 tensor viewing a private mapping of ``path``, as transformers' loader maps
    safetensors files (offset by one float: not page-aligned at either end)."""
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    return torch.empty(0).set_(storage, 1, (ROWS, COLS))


def test_a_mapped_weight_gives_its_pages_back_and_keeps_its_values(tmp_path):
    path = tmp_path / "weights.bin"
    torch.randn(ROWS * COLS + 2).numpy().tofile(path)
    mapped = _mapped(path)
    expected = mapped.double().sum().item()  # reads every page: resident now
    neighbour = mapped.view(-1)[:4].clone()
    before = _rss_file_mb()
    released = release_file_pages(mapped)
    if released == 0:
        pytest.skip("the kernel refused MADV_PAGEOUT (Linux < 5.4)")
    assert 63 * 2 ** 20 <= released < 64 * 2 ** 20  # whole pages inside the tensor only
    assert _rss_file_mb() < before - 32  # the pages left this process
    assert mapped.double().sum().item() == expected  # and come back from the file unchanged
    assert torch.equal(mapped.view(-1)[:4], neighbour)


def test_a_written_private_page_keeps_what_was_written(tmp_path):
    """A page the process changed is never dropped back to the file's content."""
    path = tmp_path / "weights.bin"
    torch.zeros(ROWS * COLS + 2).numpy().tofile(path)
    mapped = _mapped(path)
    mapped[::97].fill_(3.0)  # copy-on-write: these pages now differ from the file
    release_file_pages(mapped)
    assert bool((mapped[::97] == 3.0).all()) and float(mapped.sum()) == 3.0 * mapped[::97].numel()


def test_anonymous_memory_is_left_alone():
    t = torch.randn(1024, 1024)
    copy = t.clone()
    assert release_file_pages(t) == 0
    assert torch.equal(t, copy)
    assert release_file_pages(torch.empty(0)) == 0
