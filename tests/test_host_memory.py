"""Training processes keep the memory they free (adaptopt/cli/host_memory.py): a large buffer freed
and allocated again, as a training step does with its logits, is served without fresh page faults;
with glibc's own settings (opted out) every allocation faults its pages in again."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REALLOCATE = """
import resource, sys, torch
from adaptopt.cli.host_memory import keep_freed_memory
setting = keep_freed_memory()
for _ in range(4):  # 64 MiB, over glibc's largest mmap threshold; the heap grows to hold it (twice)
    x = torch.ones(2 ** 24); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    x = torch.ones(2 ** 24); del x
print(setting, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(**env: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", REALLOCATE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    setting, count = run.stdout.split()
    return setting, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_buffer_is_reused_without_page_faults_and_the_user_can_opt_out():
    kept, kept_faults = faults()
    system, system_faults = faults(ADAPTOPT_HOST_MALLOC="system")
    assert (kept, system) == ("kept", "system")
    pages = 2 ** 26 // 4096  # of one allocation
    assert system_faults > 3 * pages  # six allocations: each faulted its pages in afresh
    assert kept_faults < pages / 2    # the heap's pages, touched before, were reused
    assert faults(GLIBC_TUNABLES="glibc.malloc.check=0")[0] == "system"  # the user's own malloc settings stay
