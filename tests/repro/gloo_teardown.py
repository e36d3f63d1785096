"""Does a bare gloo process group hang or abort in teardown? (No adaptopt code involved.)

``python tests/repro/gloo_teardown.py --launches 40`` launches a minimal two-process torchrun job
(init gloo, a few all-reduces, destroy_process_group) that many times and counts clean exits,
aborts ("terminate called without an active exception") and hangs (no exit within the time-out).
``tests/helpers.torchrun`` relaunches a launch that hung or aborted in teardown once; this script is
the evidence for or against that being gloo's own behaviour rather than ours.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

WORKER = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones(1000)
for _ in range(20):
    dist.all_reduce(x)
dist.barrier()
dist.destroy_process_group()
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.helpers import _run_in_own_group
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        counts = {"clean": 0, "abort": 0, "hang": 0, "other": 0}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        for i in range(args.launches):
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
            try:
                run = _run_in_own_group(command, env, args.timeout)
            except subprocess.TimeoutExpired:
                counts["hang"] += 1
                print(f"launch {i}: hang", flush=True)
                continue
            if run.returncode == 0:
                counts["clean"] += 1
            elif "terminate called without an active exception" in run.stderr:
                counts["abort"] += 1
                print(f"launch {i}: abort\n{run.stderr[-800:]}", flush=True)
            else:
                counts["other"] += 1
                print(f"launch {i}: rc {run.returncode}\n{run.stderr[-800:]}", flush=True)
        print(f"{args.launches} launches in {time.monotonic() - start:.0f} s: {counts}")


if __name__ == "__main__":
    main()
