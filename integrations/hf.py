"""Hugging Face ``Trainer`` integration: pass the optimizer, add one callback.

::

    opt = AdaptiveOptimizer(model, lr=2e-5, policy="automode")      # or from_training_args(model, args, ...)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      optimizers=(opt, None), callbacks=[AdaptoptCallback()])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

The Trainer builds its LR scheduler over the optimizer's fixed param groups, so every layer
(including layers promoted later) follows it, each group at its own base LR (``lr`` for full
weights, ``lora_lr`` for factors). The Trainer calls ``opt.step()`` once per optimizer step,
after gradient accumulation and clipping; evaluation passes are not scored.

Why ``optimizers=(...)`` and not ``optimizer_cls_and_kwargs``: the Trainer builds an
optimizer from a class only *after* it has loaded a resume checkpoint's weights, so adapters
injected there would miss their saved values. Built before the Trainer, the adapters exist
when the weights load; each adapter layer takes the saved structure (ranks, factors or none)
from the checkpoint's state dict, and the optimizer's own ``load_state_dict`` — in
``optimizer.pt`` beside the weights — then restores exact modes, LR scales, scores, history
and Adam moments.

:class:`AdaptoptCallback` feeds the epoch length to policies that count in epochs, logs
every transition through the ``transformers`` logger (``transformers.adaptopt``) and into ``trainer.state.log_history``,
adds mode counts to each log line, and writes a readable ``adaptopt.json`` (modes, ranks,
scores, history) into each checkpoint directory.

Checkpoints and ``trainer.save_model()`` folders hold the model's state dict in the plain
layer names (``adaptopt/layers/state_dict_keys.py``): ``AutoModel*.from_pretrained(folder)`` loads the
trained function without adaptopt. A model with 4-bit layers cannot be loaded that way (its
packed weights stop the load with a size mismatch); :func:`load_checkpoint` loads any of them,
exactly, into a model prepared as for training.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from transformers import TrainerCallback
from transformers.utils import logging

from adaptopt import AdaptiveOptimizer, Mode, find_adapters
from adaptopt.formats.hf_folders import SIDECAR, exact_state_dict, read_sidecar, save_plainly
from adaptopt.layers.sharded import is_sharded
from adaptopt.training.distributed import ReplicatedGradients, active_group
from adaptopt.training.scoring_pass import kept_rng, why_no_scoring_pass

# A child of the library's logger: transformers.logging.set_verbosity_info() and
# TrainingArguments(log_level="info") show the transitions, through transformers' own handler.
logger = logging.get_logger("transformers.adaptopt")
STATE_FILE = "adaptopt.json"


def _safetensors_files(folder: str) -> list[str]:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    raise FileNotFoundError(f"{folder} holds no model.safetensors (or its index): pass a Trainer checkpoint "
                            "or a save_model/save_pretrained folder")


def _keys(file: str) -> list[str]:
    from safetensors import safe_open
    with safe_open(file, framework="pt") as f:
        return list(f.keys())


def base_model_weights(name_or_path: str) -> Callable[[str], Any]:
    """``key → tensor`` from the base model's safetensors files (a local folder, or a hub id already
    in the local cache), read one tensor at a time; the files are found on the first read."""
    from safetensors import safe_open
    where: dict[str, str] = {}

    def read(key: str) -> Any:
        if not where:
            folder = name_or_path
            if not os.path.isdir(folder):
                from huggingface_hub import snapshot_download
                folder = snapshot_download(name_or_path, local_files_only=True)
            for file in _safetensors_files(folder):
                with safe_open(file, framework="pt") as f:
                    where.update(dict.fromkeys(f.keys(), file))
        if key not in where:
            raise KeyError(f"{key} is not in the base model's files")
        with safe_open(where[key], framework="pt") as f:
            return f.get_tensor(key)
    return read


def load_checkpoint(model: Any, folder: str | os.PathLike) -> Any:
    """Load a Trainer checkpoint or ``save_model`` folder into ``model`` — built and adapted as for
    training (``inject_adapters`` or ``AdaptiveOptimizer`` with the same targets and 4-bit
    settings) — exactly, every key checked: the plain weights, and the adapter layers' exact tensors
    from the sidecar (``adaptopt/formats/hf_folders.py``), unchanged base weights read back from the
    base model it names. Returns ``model``. Safetensors only."""
    from safetensors.torch import load_file
    folder = os.fspath(folder)
    state: dict[str, Any] = {}
    for file in _safetensors_files(folder):
        state.update(load_file(file))
    sidecar = read_sidecar(folder)
    if sidecar is not None:
        tensors, metadata = sidecar
        state = exact_state_dict(state, tensors, metadata, base_model_weights(metadata["base_model"]))
    tied = {k for k in getattr(model, "_tied_weights_keys", None) or () if isinstance(k, str)}
    fix = ("Build the model and its adapters (targets, 4-bit settings) as for the run that saved it, "
           "then load again")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{folder} does not fit this model ({str(e).splitlines()[-1].strip()}). {fix}") from e
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}. {fix}")
    return model


def refuse_deepspeed_plugin() -> None:
    """The Trainer was configured for DeepSpeed (``TrainingArguments(deepspeed=...)``): refused by name."""
    raise ValueError("AdaptoptCallback: this Trainer runs DeepSpeed (TrainingArguments.deepspeed), which adaptopt "
                     "does not support: ZeRO fixes the trained set when it initializes, so the optimizer's moves "
                     "between frozen, LoRA and full would not reach it. Drop deepspeed=; for sharding use FSDP2 "
                     "(fully_shard, docs/integrations.md), for data parallelism the Trainer's own DDP")


def find_adaptive_optimizer(optimizer: Any) -> AdaptiveOptimizer:
    """The :class:`AdaptiveOptimizer` inside the Trainer's (possibly accelerate-wrapped) optimizer."""
    seen = optimizer
    for _ in range(4):
        if isinstance(seen, AdaptiveOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None)
    raise ValueError(f"AdaptoptCallback found no AdaptiveOptimizer in the Trainer (got {type(optimizer).__name__}): "
                     "pass optimizers=(AdaptiveOptimizer(model, ...), None) to the Trainer")


def from_training_args(model: Any, args: Any, **kwargs: Any) -> AdaptiveOptimizer:
    """``AdaptiveOptimizer(model, ...)`` with the Trainer's ``learning_rate``, ``weight_decay``,
    Adam betas and epsilon; ``kwargs`` (``policy=``, ``lora_lr=``, ...) override them."""
    settings = {"lr": args.learning_rate, "weight_decay": args.weight_decay,
                "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return AdaptiveOptimizer(model, **{**settings, **kwargs})


def update_steps_per_epoch(train_dataloader: Any, gradient_accumulation_steps: int, max_steps: int) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them (a last partial accumulation
    still steps); ``max_steps`` when the loader has no length."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        return max(int(max_steps), 1)
    return max(batches // gradient_accumulation_steps + int(batches % gradient_accumulation_steps > 0), 1)


def mode_counts(opt: AdaptiveOptimizer) -> dict[str, int]:
    counts = {f"adaptopt/{m.value}": 0 for m in Mode}
    for module in opt.layers.values():
        counts[f"adaptopt/{module.mode.value}"] += 1
    counts["adaptopt/trainable_params"] = opt.trainable_parameter_count()
    return counts


def mode_line(opt: AdaptiveOptimizer) -> str:
    """``full 2 · lora 10 · frozen 0 · 3.66M trainable``: the layers per mode and the trained parameters."""
    counts = mode_counts(opt)
    trainable = counts["adaptopt/trainable_params"]
    size = f"{trainable / 1e6:.2f}M" if trainable >= 1e6 else f"{trainable / 1e3:.1f}k"
    return " · ".join(f"{m.value} {counts[f'adaptopt/{m.value}']}" for m in (Mode.FULL, Mode.LORA, Mode.FROZEN)) + (
        f" · {size} trainable")


def decision_summary(opt: AdaptiveOptimizer, records: list[dict[str, Any]]) -> str:
    """One line for a decision: its step, what moved (``12 lora→full``), and the modes after it."""
    moves: dict[str, int] = {}
    for h in records:
        key = f"{h['from_mode']}→{h['mode']}" if h["from_mode"] != h["mode"] else f"{h['mode']} rank/lr"
        moves[key] = moves.get(key, 0) + 1
    moved = ", ".join(f"{n} {key}" for key, n in moves.items())
    return f"adaptopt step {records[0]['step']}: {len(records)} layer(s) moved ({moved}); now {mode_line(opt)}"


def state_summary(opt: AdaptiveOptimizer) -> dict[str, Any]:
    """Modes, ranks, LR scales, latest scores and the transition history, as plain JSON."""
    return {"step": opt.step_count, "steps_per_epoch": opt.steps_per_epoch, "policy": opt.policy.config(),
            "layers": {name: {"mode": m.mode.value, "rank": m.rank, "lr_scale": opt.lr_scales[name],
                              "scores": opt.scores.get(name, {})} for name, m in opt.layers.items()},
            "history": opt.history}


class _NoLoss(Exception):
    pass


def score_first_batch(opt: AdaptiveOptimizer, model: Any, train_dataloader: Any) -> bool:
    """The scoring pass (:meth:`AdaptiveOptimizer.score_before_training`) on the first training batch,
    when the policy decides from one batch. The batch is read from the torch ``DataLoader`` under
    accelerate's wrapper (which reads ahead and tracks its own position), the random states kept, so
    the Trainer's data order is the same as without the pass; the model runs in training mode, as in
    a step, and returns to its mode. Where no pass can run — another policy, a resumed run,
    ``torch.distributed``, a batch or model without a loss — nothing happens and the policy decides
    after the first step. Returns whether the pass decided."""
    if model is None or train_dataloader is None or why_no_scoring_pass(opt) is not None:
        return False
    import torch
    loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
    with kept_rng():
        batch = next(iter(loader), None)
    if not isinstance(batch, Mapping):
        return False
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def closure() -> None:
        output = model(**batch)
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is None:
            raise _NoLoss
        loss.backward()
    was_training = model.training
    model.train()
    try:
        return opt.score_before_training(closure)
    except _NoLoss:
        return False
    finally:
        model.train(was_training)


class AdaptoptCallback(TrainerCallback):
    """Connects an :class:`AdaptiveOptimizer` passed to the Trainer with the Trainer's loop.

    Args:
        optimizer: the optimizer; default: found in the Trainer's at the start of training.
        log_transitions: log each transition (layer, from → to, scores) at INFO level.
    """

    def __init__(self, optimizer: AdaptiveOptimizer | None = None, log_transitions: bool = True) -> None:
        self.optimizer = optimizer
        self.log_transitions = log_transitions
        self._logged = 0
        self._ranks: Any = None  # the transition hook that keeps the Trainer's DDP ranks together

    def _opt(self, kwargs: dict[str, Any]) -> AdaptiveOptimizer:
        if self.optimizer is None:
            self.optimizer = find_adaptive_optimizer(kwargs.get("optimizer"))
        return self.optimizer

    def on_init_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(args, "deepspeed", None):
            refuse_deepspeed_plugin()
        if model is not None and callable(getattr(model, "save_pretrained", None)) and find_adapters(model):
            save_plainly(model)  # checkpoints and save_model: plain weights + the exact sidecar

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        opt = self._opt(kwargs)
        if state.global_step > 0:
            self._restore_exact(args, state, opt)
        self._keep_ranks_together(opt)
        opt.set_steps_per_epoch(update_steps_per_epoch(kwargs.get("train_dataloader"),
                                                       args.gradient_accumulation_steps, state.max_steps))
        if state.max_steps and state.max_steps > 0:
            opt.set_total_steps(int(state.max_steps))
        if opt.step_count != state.global_step:
            logger.warning(f"adaptopt: the optimizer is at step {opt.step_count} but the Trainer at "
                           f"{state.global_step} (skipped non-finite steps, or a resume without optimizer.pt); "
                           "epoch-based decisions follow the optimizer's count")
        self._logged = len(opt.history)
        if state.global_step == 0:  # its decision is logged with the first step's
            score_first_batch(opt, kwargs.get("model"), kwargs.get("train_dataloader"))
        logger.info(f"adaptopt: {opt.steps_per_epoch} optimizer steps per epoch, policy {opt.policy.method!r}")

    def _keep_ranks_together(self, opt: AdaptiveOptimizer) -> None:
        """Under the Trainer's own DDP (torchrun or accelerate launch without FSDP) DDP reduces the
        gradients of what trained when it was built; a parameter that starts training later (a FULL
        block, fresh factors) would be left per-rank and the ranks would drift apart silently. The
        optimizer starts new factors alike on every rank; here every trained gradient is averaged
        over the ranks as soon as backward makes it. Which parameters the Trainer's DDP covers is not
        visible from a callback (a resume changes the trained set after DDP is built), so all are:
        DDP's own reduction then averages values already equal — correct, at twice the gradient
        communication (docs/integrations.md)."""
        group = active_group(opt.process_group)
        if group is None or self._ranks is not None or any(is_sharded(p) for p in opt.model.parameters()):
            return
        replicated = ReplicatedGradients()

        def follow(optimizer: AdaptiveOptimizer) -> None:
            replicated.watch([p for g in optimizer.param_groups for p in g["params"]], group)
        follow(opt)
        self._ranks = opt.register_transition_hook(follow)

    def _restore_exact(self, args: Any, state: Any, opt: AdaptiveOptimizer) -> None:
        """A resumed run: the Trainer has loaded the checkpoint's plain weights and the optimizer's
        state (every layer's layout); the sidecar gives the layers their exact tensors."""
        given = getattr(args, "resume_from_checkpoint", None)
        folder = given if isinstance(given, str) and os.path.isdir(given) else os.path.join(
            args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isfile(os.path.join(folder, SIDECAR)):
            load_checkpoint(opt.model, folder)
            return
        written_before = os.path.isdir(folder) and any(
            ".lora_A" in key or key.endswith(".delta") for file in _safetensors_files(folder)
            for key in _keys(file))  # checkpoints from before the sidecar held the factors in their weights
        if not written_before and any(m.lora_A is not None or getattr(m, "delta", None) is not None
                                      for m in opt.layers.values()):
            raise ValueError(f"adaptopt: resuming at step {state.global_step}, but {folder} holds no {SIDECAR} (the "
                             "adapter layers' exact tensors), so the factors would restart from scratch. Name the "
                             "checkpoint in TrainingArguments(resume_from_checkpoint=PATH) as well, or resume with "
                             "trainer.train(resume_from_checkpoint=True) from the run's own output_dir")

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        opt = self._opt(kwargs)
        fresh = opt.history[self._logged:]
        self._logged = len(opt.history)
        if not fresh:
            return
        state.log_history.append({"step": state.global_step, "adaptopt/transitions": len(fresh), **mode_counts(opt)})
        if self.log_transitions and state.is_world_process_zero:
            # one line per decision at the Trainer's default verbosity (WARNING), the layers at INFO
            logger.warning(decision_summary(opt, fresh))
            for h in fresh:
                scores = ", ".join(f"{k}={v:.4g}" for k, v in sorted(h["scores"].items())[:4])
                logger.info(f"adaptopt step {h['step']}: {h['layer']} {h['from_mode']}(r{h['from_rank']}) → "
                            f"{h['mode']}(r{h['rank']}) lr×{h['lr_scale']:g} [{scores}]")

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        counts = mode_counts(self._opt(kwargs))
        if logs is not None:
            logs.update(counts)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(counts)

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(state_summary(self._opt(kwargs)), f, indent=1, default=str)
