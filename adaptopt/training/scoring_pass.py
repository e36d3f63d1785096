"""A scoring pass before training: the first decision from one batch, before the first update.

A policy that decides from the first step's gradients (``Hybrid(calibration_steps=1)``) otherwise
decides *after* that step's update, so the units it chooses take the first update as LoRA and start
FULL with fresh Adam moments one step late. The pass runs forward and backward on one batch with the
statistics hooks armed, keeps the scores, drops the gradients, and lets the policy decide at step 0;
the first update then trains the chosen units FULL — the assignment its static twin trains from the
start (docs/optimizer.md, "A scoring pass before training").

What the pass leaves unchanged: every weight (no update), every ``.grad`` (None before and after),
and the random number generators (torch CPU and CUDA, Python's ``random``, NumPy's global one), so
dropout masks and a sampler drawing from them are those of a run without the pass.
"""
from __future__ import annotations

import contextlib
import random
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .distributed import active_group

if TYPE_CHECKING:
    from .optimizer import AdaptiveOptimizer


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Restore torch's (CPU and every initialised CUDA device), Python's and NumPy's global random
    states on exit: what runs inside draws nothing a later draw would notice."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    python = random.getstate()
    numpy = sys.modules.get("numpy")
    np_state = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        if np_state is not None:
            numpy.random.set_state(np_state)


def why_no_scoring_pass(opt: "AdaptiveOptimizer") -> str | None:
    """Why ``opt`` cannot run a scoring pass now, or ``None`` if it can."""
    policy = opt.policy
    if not policy.decides_before_training():
        return (f"policy {policy.method!r} does not decide from one batch (only Hybrid(calibration_steps=1) does); "
                "train without a scoring pass")
    if policy.scored_before_training:
        return "this run's scoring pass already ran; its decision stands"
    if opt.step_count or opt.skipped_steps:
        return (f"the optimizer has already taken {opt.step_count + opt.skipped_steps} step(s); a scoring pass "
                "comes before the first one")
    if active_group(opt.process_group) is not None or opt._sharded:
        return ("under torch.distributed each rank would score its own batch; the policy decides after the "
                "first step there, with the ranks' scores reduced")
    with_grad = [opt._name_of(p) for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if with_grad:
        return (f"{with_grad[:4]} already hold gradients, which the pass would mix into its scores: call "
                "opt.zero_grad() first")
    return None


def score_before_training(opt: "AdaptiveOptimizer", closure: Callable[[], Any]) -> bool:
    """Run ``closure`` (forward and backward on one training batch) as a scoring pass and let the
    policy decide at step 0. Returns whether it decided: non-finite gradients leave the policy to
    decide after the first step, as without the pass, with a warning. Raises ``ValueError`` (before
    running anything) when :func:`why_no_scoring_pass` names a reason."""
    reason = why_no_scoring_pass(opt)
    if reason is not None:
        raise ValueError(f"score_before_training: {reason}")
    trained = [p for g in opt.param_groups for p in g["params"]]
    try:
        with kept_rng(), torch.enable_grad():
            closure()
        finite = opt._grads_finite()
        if finite:
            opt.collector.observe_step()
            finite = opt.collector.commit()
    except BaseException:
        opt.collector.discard()  # a pass that failed leaves no scores behind
        raise
    finally:
        for p in trained:
            p.grad = None
    if not finite:
        opt.collector.discard()
        warnings.warn("score_before_training: the batch gave non-finite gradients; nothing was decided, the "
                      "policy decides after the first step instead", stacklevel=3)
        return False
    opt.policy.scored_before_training = True
    opt.decide()
    opt._arm_for(1)
    return True
