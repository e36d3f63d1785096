"""What the optimizer says about the run's length: a resume that brings another length, and a run
too short for the policy's schedule (docs/design.md §7). Pure: each returns a message or ``None``."""
from __future__ import annotations

from ..policies.base import Policy


def run_length_change(policy: Policy, fixed: int, new: int) -> str | None:
    """The run now has ``new`` steps, but ``policy`` placed steps when its length was first known
    (``fixed``) and keeps them: the message naming both lengths and the steps kept."""
    placed = policy.placed_by_run_length()
    if not placed or fixed == new:
        return None
    kept = ", ".join(f"{what} {step}" for what, step in placed.items())
    return (f"this run has {new} optimizer steps, but policy {policy.method!r} placed decisions at a fraction of the "
            f"run when its length was first known ({fixed} steps), and keeps them: {kept}. To place them for {new} "
            "steps, start from a fresh optimizer (or give such settings as steps)")


def run_too_short(policy: Policy, total: int | None, steps_per_epoch: int | None) -> str | None:
    """The policy scores or decides during a run of ``total`` steps, but no decision falls before the
    last step, so nothing it decides would ever train: the message naming its first decision step."""
    if total is None or (steps_per_epoch is None and policy.needs_epochs()):
        return None
    first = next((s for s in range(1, total + 1) if policy.is_decision_step(s, steps_per_epoch)), None)
    if first is not None and first < total:
        return None
    if first is None:
        if not any(policy.wants_stats(s, steps_per_epoch) for s in range(1, total + 1)):
            return None  # a static policy: nothing to decide
        first = next((s for s in range(total + 1, 100 * total + 100) if policy.is_decision_step(s, steps_per_epoch)),
                     None)
    at = f"at step {first}" if first is not None else "after this run"
    return (f"policy {policy.method!r} makes its first decision {at}, but this run has {total} optimizer steps: "
            "nothing it decides will train, and the run trains its initial assignment throughout. Run longer, or "
            "shorten the policy's schedule (e.g. Hybrid(calibration_steps=...), AutoMode(u=...))")
