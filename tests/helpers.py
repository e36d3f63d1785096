"""Small builders shared by the tests: a transformers-free Conv1D, tolerances, model snapshots."""
from __future__ import annotations

import torch
from torch import nn


class Conv1D(nn.Module):
    """GPT-2's Conv1D re-declared here (weight stored (in, out)), so core tests need no transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


def make_base(kind: str, in_features: int, out_features: int, *, bias: bool = True,
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """An ``nn.Linear`` or a ``Conv1D`` with unit-scale random weights."""
    if kind == "conv1d":
        module = Conv1D(out_features, in_features)
        if not bias:
            module.bias = None
            module.forward = lambda x: (x.reshape(-1, x.size(-1)) @ module.weight).view(*x.shape[:-1], module.nf)
    else:
        module = nn.Linear(in_features, out_features, bias=bias)
        with torch.no_grad():
            module.weight.normal_(0, 0.5)
    return module.to(dtype)


def randomize_adapter(module: nn.Module, std: float = 0.5) -> None:
    """Give the module a non-zero learned update, as training would (B starts at zero)."""
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "delta"):
            p = getattr(module, name, None)
            if p is not None and p.requires_grad:
                p.normal_(0, std)


def simulate_training(module: nn.Module) -> None:
    """Change whatever trains in the current mode, as an optimizer step would."""
    from adaptopt import Mode
    with torch.no_grad():
        if module.mode is Mode.LORA:
            module.lora_A.add_(torch.randn_like(module.lora_A) * 0.3)
            module.lora_B.add_(torch.randn_like(module.lora_B) * 0.3)
        elif module.mode is Mode.FULL:
            trained = module.delta if getattr(module, "delta", None) is not None else module.weight
            trained.add_(torch.randn_like(trained) * 0.05)


def abs_scale(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``|x| @ |W|ᵀ + s·(|x| @ |A|ᵀ) @ |B|ᵀ + |b|`` (+ ``|x| @ |D|ᵀ``): the magnitude every output
    element's rounding error is proportional to (the classic dot-product error bound)."""
    x = x.float().abs()
    weight = dense_base_weight(module).abs()
    scale = x @ weight.T
    if getattr(module, "lora_A", None) is not None:
        a, b = module.lora_A.detach().float().abs(), module.lora_B.detach().float().abs()
        scale = scale + module.scaling * (x @ a.T) @ b.T
    if getattr(module, "delta", None) is not None:
        scale = scale + x @ module.delta.detach().float().abs().T
    if module.bias is not None:
        scale = scale + module.bias.detach().float().abs()
    return scale


def dense_base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen/base weight of an adapter module as fp32 ``(out, in)``."""
    from adaptopt.layers.quant import QuantLoRALinear, dequantize
    if isinstance(module, QuantLoRALinear):
        return dequantize(module.base).float()
    w = module.base.weight.detach().float()
    return w.T if module.fan_in_fan_out else w


def snapshot(model: nn.Module) -> dict:
    """Everything an error must leave untouched: module types, tensors and requires_grad flags."""
    return {
        "types": [(name, type(m).__name__) for name, m in model.named_modules()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["types"] == after["types"]
    assert before["grad"] == after["grad"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def _run_in_own_group(command, env, timeout, on_timeout=None):
    """``subprocess.run`` whose whole process group (the launcher and its workers) is killed on a
    time-out, so a hung worker does not outlive the test; ``on_timeout(pids)`` sees them first."""
    import os
    import signal
    import subprocess
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: collect them before the launcher
        # dies (they would be re-parented), or a hung worker keeps the pipes open for ever
        workers = _descendants(process.pid)
        if on_timeout is not None:
            on_timeout(workers)
        os.killpg(process.pid, signal.SIGKILL)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...), read from /proc."""
    from pathlib import Path
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def torchrun(script, *args: str, processes: int = 2, timeout: float = 180.0):
    """Run ``script`` under ``torchrun --standalone`` on CPU; returns the finished process.

    The teardown hang once seen in about one launch in twenty is explained: a DDP reducer freed
    *after* ``destroy_process_group()`` holds the last reference to the gloo process group, whose
    destructor joins gloo's worker thread while holding the GIL, and that thread waits for the GIL
    to free a finished operation's tensors (``py-spy dump --native`` of a hung rank;
    ``tests/repro/gloo_teardown.py``: 2 hangs in 30 launches of ``examples/ddp_torchrun.py`` before
    ``AdaptiveDDP.close()``, 0 in 40 of a bare gloo group and 0 in 30 of a bare DDP worker that
    drops its wrapper first). Our examples and docs now drop the wrapper first. Workers whose DDP
    wrapper a framework owns (the Trainer's, accelerate's) can still free it late, so a launch
    that hangs past ``timeout`` or aborts in teardown is relaunched once, with a warning.
    """
    import os
    import subprocess
    import sys
    import warnings
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        try:
            run = _run_in_own_group(command, env, timeout)
        except subprocess.TimeoutExpired:
            if attempt:
                raise
            warnings.warn(f"torchrun {script} hung for {timeout:.0f} s; relaunching once", stacklevel=2)
            continue
        if run.returncode == 0 or attempt or "terminate called without an active exception" not in run.stderr:
            return run
        warnings.warn(f"torchrun {script} aborted in teardown; relaunching once", stacklevel=2)
    return run


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists without ties (1 − 6Σd²/(n(n²−1)))."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))
