"""Does a bare gloo process group hang or abort in teardown? (No adaptopt code involved.)

``python tests/repro/gloo_teardown.py --launches 40`` launches a minimal two-process torchrun job
(init gloo, a few all-reduces, destroy_process_group) that many times and counts clean exits,
aborts ("terminate called without an active exception") and hangs (no exit within the time-out).
``tests/helpers.torchrun`` relaunches a launch that hung or aborted in teardown once; this script is
the evidence for or against that being gloo's own behaviour rather than ours: ``--ddp`` launches a bare
DDP worker (no adaptopt, DDP rebuilt as AdaptiveDDP does), ``--script FILE`` any script (e.g.
``examples/ddp_torchrun.py``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

DDP_WORKER = """
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
for rebuild in range(3):  # DDP rebuilt as AdaptiveDDP does after a transition
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(4):
        ddp(torch.randn(8, 64)).sum().backward()
        opt.step(); opt.zero_grad()
    del ddp
dist.barrier()
dist.destroy_process_group()
"""
WORKER = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones(1000)
for _ in range(20):
    dist.all_reduce(x)
dist.barrier()
dist.destroy_process_group()
"""


def dump_stacks(pids: list[int]) -> None:
    for pid in pids:
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")  # pip install py-spy
        out = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
        print(f"--- process {pid}\n{out.stdout[-6000:]}{out.stderr[-500:]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--ddp", action="store_true", help="a bare DDP worker (no adaptopt), rebuilt three times")
    parser.add_argument("--script", help="launch this script instead of the bare gloo worker (e.g. "
                        "examples/ddp_torchrun.py, to compare with adaptopt's own workers)")
    parser.add_argument("--dump", action="store_true", help="on a hang, print every stuck process's Python and "
                        "native stacks (py-spy dump --native) before killing it")
    parser.add_argument("script_args", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.helpers import _run_in_own_group
    with tempfile.TemporaryDirectory() as folder:
        script = args.script or os.path.join(folder, "worker.py")
        if not args.script:
            with open(script, "w") as f:
                f.write(DDP_WORKER if args.ddp else WORKER)
        counts = {"clean": 0, "abort": 0, "hang": 0, "other": 0}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        for i in range(args.launches):
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                       *[a.replace("{i}", str(i)) for a in args.script_args]]
            try:
                run = _run_in_own_group(command, env, args.timeout, on_timeout=dump_stacks if args.dump else None)
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
