"""DistributedDataParallel that follows the optimizer's transitions.

DDP binds its gradient all-reduce to the parameters that require grad *when it is built*.
After a transition that starts training a parameter (a fresh LoRA factor, a promoted
weight), the old wrapper would silently leave that parameter's gradient un-reduced and the
ranks would drift apart (measured, docs/design.md §8). :class:`AdaptiveDDP` rebuilds the
wrapper after every transition; building DDP also broadcasts rank 0's parameters and
buffers, so freshly initialised factors start identical on every rank.

Use it where you would use ``DistributedDataParallel``::

    opt = AdaptiveOptimizer(model, lr=2e-5, policy="automode", steps_per_epoch=len(loader))
    ddp = AdaptiveDDP(model, opt)             # kwargs go to DistributedDataParallel
    for batch in loader:
        ddp(**batch).loss.backward()
        opt.step(); opt.zero_grad()
    ddp.close()                               # before dist.destroy_process_group()

Ranks agree on decisions by construction (:mod:`adaptopt.training.distributed`); transitions happen
inside ``opt.step()``, at the same step on every rank, so every rank rebuilds together.
"""
from __future__ import annotations

import gc
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adaptopt import AdaptiveOptimizer


class AdaptiveDDP:
    """A ``DistributedDataParallel(module, **ddp_kwargs)`` rebuilt after every transition.

    Calls and attributes go to the current wrapper (``ddp(...)``, ``ddp.no_sync()``,
    ``ddp.module``). ``rebuilds`` counts the rebuilds after construction. While no parameter
    trains at all, the module runs unwrapped (DDP refuses such a module).
    """

    def __init__(self, module: nn.Module, optimizer: AdaptiveOptimizer, **ddp_kwargs: Any) -> None:
        if optimizer.model is not module:
            raise ValueError("AdaptiveDDP needs the module the optimizer was built on (build the optimizer "
                             "on the plain model, then wrap it here; not on a DDP-wrapped model)")
        self._module = module
        self._ddp_kwargs = ddp_kwargs
        self.rebuilds = 0
        self.wrapper: nn.Module = self._wrap()
        self._handle = optimizer.register_transition_hook(self._on_transition)

    def _wrap(self) -> nn.Module:
        if not any(p.requires_grad for p in self._module.parameters()):
            return self._module
        return DistributedDataParallel(self._module, **self._ddp_kwargs)

    def _on_transition(self, optimizer: AdaptiveOptimizer) -> None:
        old, self.wrapper = self.wrapper, self._module
        del old
        gc.collect()  # the old reducer's autograd hooks go with it
        self.wrapper = self._wrap()
        self.rebuilds += 1

    @property
    def module(self) -> nn.Module:
        """The plain model (wrapped or not)."""
        return self._module

    def detach(self) -> nn.Module:
        """Stop following the optimizer; returns the plain module."""
        self._handle.remove()
        return self._module

    def close(self) -> nn.Module:
        """Stop following the optimizer and drop the DDP wrapper (its gradient reducer) now; returns the
        plain module. Call it before ``torch.distributed.destroy_process_group()``: a reducer freed
        *after* it holds the last reference to the gloo process group, whose destructor then joins
        gloo's worker thread while holding the GIL — a thread that may need the GIL to release a
        finished operation's tensors: both wait for ever. (Seen as the rare torchrun hang in
        teardown; ``py-spy dump --native`` of a hung rank shows ``Reducer::~Reducer`` →
        ``ProcessGroupGloo::~ProcessGroupGloo`` → ``std::thread::join`` in the main thread, and the
        worker thread in ``gil_scoped_acquire`` under ``AsyncWork::~AsyncWork``;
        ``tests/repro/gloo_teardown.py``.)"""
        module = self.detach()
        self.wrapper = module
        gc.collect()
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        wrapper = self.__dict__.get("wrapper")
        if wrapper is None:
            raise AttributeError(name)
        return getattr(wrapper, name)
