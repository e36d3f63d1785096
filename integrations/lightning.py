"""PyTorch Lightning integration: return the optimizer from ``configure_optimizers``, add one callback.

::

    class Module(L.LightningModule):
        def configure_optimizers(self):
            return AdaptiveOptimizer(self, lr=1e-3, policy="automode")

    trainer = L.Trainer(callbacks=[AdaptoptLightning()], ...)
    trainer.fit(module)                    # trainer.fit(module, ckpt_path="last.ckpt") resumes exactly

Two things Lightning's order of work needs:

- **Resume.** ``fit(ckpt_path=...)`` restores the module's weights *before* it calls
  ``configure_optimizers``, so the adapters (built by the optimizer) would not exist yet and
  the weights would not fit. :class:`AdaptoptLightning` calls ``configure_optimizers`` once in
  its ``setup`` hook, which Lightning runs before the restore, and hands the same result to
  Lightning when it asks. Each adapter layer then takes the saved structure from the weights,
  and the optimizer's ``load_state_dict`` (Lightning's ``optimizer_states``) restores the exact
  modes, ranks, scores, history and Adam moments.
- **Randomness.** Lightning's checkpoints do not keep torch's RNG state; the callback saves and
  restores it (its ``state_dict``), so adapters started after a resume (fresh ``A``) and dropout
  masks are the uninterrupted run's.
- **Epoch length.** Policies that decide "u times per epoch" get the number of optimizer steps
  per epoch at the start of training: ``⌈batches / accumulate_grad_batches⌉`` (Lightning steps
  on the last, partial accumulation too).

Transitions are logged at INFO through ``lightning.pytorch.adaptopt`` (shown where Lightning's own
messages are) and the mode counts through
``LightningModule.log`` (``adaptopt/full``, ``adaptopt/lora``, ``adaptopt/frozen``).
Lightning's single-device and DDP strategies work; under DDP wrap nothing yourself —
Lightning's DDP binds the parameters that train when it starts, so use policies whose trained
set does not change (or ``adaptopt.integrations.ddp.AdaptiveDDP`` in a plain loop).
"""
from __future__ import annotations

import logging
import math
from typing import Any

from lightning.pytorch import Callback

from adaptopt import AdaptiveOptimizer, Mode

# A child of Lightning's logger, which shows INFO by default: transitions appear beside its own messages.
logger = logging.getLogger("lightning.pytorch.adaptopt")


def adaptive_optimizers(configured: Any) -> list[AdaptiveOptimizer]:
    """The :class:`AdaptiveOptimizer` s in whatever ``configure_optimizers`` returned (an optimizer,
    a list or tuple of them, ``([optimizers], [schedulers])``, or a dict with ``"optimizer"``)."""
    if isinstance(configured, AdaptiveOptimizer):
        return [configured]
    if isinstance(configured, dict):
        return adaptive_optimizers(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        return [opt for item in configured for opt in adaptive_optimizers(item)]
    return []


def steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps in one epoch as Lightning takes them."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) and not (isinstance(batches, float) and math.isfinite(batches)):
        return max(int(trainer.max_steps), 1)  # an iterable without a length
    return max(math.ceil(int(batches) / trainer.accumulate_grad_batches), 1)


class AdaptoptLightning(Callback):
    """Makes ``configure_optimizers`` returning an :class:`AdaptiveOptimizer` work under Lightning:
    adapters exist before a checkpoint's weights are restored, epoch-counting policies know the
    epoch length, transitions are logged."""

    def __init__(self) -> None:
        self.optimizers: list[AdaptiveOptimizer] = []
        self._logged = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.optimizers:
            return
        configured = pl_module.configure_optimizers()
        self.optimizers = adaptive_optimizers(configured)
        if not self.optimizers:
            raise ValueError(f"AdaptoptLightning: configure_optimizers returned {type(configured).__name__}, with no "
                             "AdaptiveOptimizer in it; return AdaptiveOptimizer(self, ...) (alone, in a list, or "
                             "under 'optimizer')")
        # Lightning asks after restoring the checkpoint's weights; it gets the optimizer built here
        pl_module.configure_optimizers = lambda: configured

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning's checkpoint: torch's RNG states, which Lightning itself does not keep.
        Fresh adapter factors (a layer entering LORA) and dropout draw from them, so without this a
        resumed run would start different factors than the uninterrupted one."""
        import torch
        state = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import torch
        if "torch_rng" in state_dict:
            torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        total = trainer.estimated_stepping_batches
        for opt in self.optimizers:
            opt.set_steps_per_epoch(steps_per_epoch(trainer))
            if isinstance(total, int) or (isinstance(total, float) and math.isfinite(total)):
                opt.set_total_steps(max(int(total), 1))
        self._logged = sum(len(opt.history) for opt in self.optimizers)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        fresh = [h for opt in self.optimizers for h in opt.history][self._logged:]
        self._logged += len(fresh)
        for h in fresh:
            logger.info(f"adaptopt step {h['step']}: {h['layer']} {h['from_mode']}(r{h['from_rank']}) → "
                        f"{h['mode']}(r{h['rank']})")
        if fresh and trainer.logger is not None:
            counts = {f"adaptopt/{m.value}": float(sum(layer.mode is m for opt in self.optimizers
                                                       for layer in opt.layers.values())) for m in Mode}
            pl_module.log_dict(counts, on_step=True, on_epoch=False)
