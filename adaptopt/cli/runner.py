"""One fine-tune (``adaptopt train``) and a grid of them (``adaptopt compare``).

A run: load data and model, build ``AdaptiveOptimizer`` for the method, train with the HF
Trainer (progress bars, linear warmup/decay, ``AdaptoptCallback``), evaluate (accuracy and
macro-F1, or loss and perplexity), then write ``result.json``, ``decisions.json`` (every
decision: step, layer, scores, mode, rank, LR scale; the trainable-parameter timeline) and
the run's plots. ``compare`` runs each (method, seed) in a fresh process, so every run's peak
memory (RSS) is its own.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError
from .data import TextData, load_data
from .methods import optimizer_kwargs
from .models import load_model


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` survives
    ``execve``, so a process spawned by a large parent would report the parent's peak (measured:
    every run of a compare grid read the same 2.3 GB). Elsewhere, ``ru_maxrss`` (macOS: bytes).
    """
    import resource
    import sys
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def build(config: Mapping[str, Any], method_cfg: Mapping[str, Any], seed: int, data: TextData | None = None,
          split: str = "test"):
    """``(data, model, tokenizer, optimizer)``, or a ConfigError naming what cannot run."""
    import transformers

    from adaptopt import AdaptiveOptimizer
    data = data or load_data(config["data"], split)
    transformers.set_seed(seed)
    model, tokenizer = load_model(config["model"], data.task, max(data.num_labels, 2), data.label_names)
    check_max_length(config["training"]["max_length"], model, config["source"])
    where = f"{config['source']}: fine_tuning ({method_cfg['label']})"
    try:
        opt = AdaptiveOptimizer(model, **optimizer_kwargs(method_cfg, config["training"], where))
    except (ValueError, TypeError, ImportError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from None
    return data, model, tokenizer, opt


def check_max_length(max_length: int, model: Any, source: str) -> None:
    """``training.max_length`` must fit the model's position embeddings (else the first batch crashes)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ConfigError(f"{source}: training.max_length: {max_length}, but this model reads at most {limit} "
                          f"positions (config.max_position_embeddings); set training.max_length ≤ {limit}")


def tokenized(data: TextData, tokenizer: Any, max_length: int, split: str) -> list[dict[str, Any]]:
    texts = data.train_texts if split == "train" else data.eval_texts
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    rows = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
    if data.task == "classification":
        labels = data.train_labels if split == "train" else data.eval_labels
        for row, label in zip(rows, labels):
            row["labels"] = label
    return rows


def collator(data: TextData, tokenizer: Any):
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding
    if data.task == "classification":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def evaluate(model: Any, rows: list[dict[str, Any]], data: TextData, tokenizer: Any, batch_size: int,
             progress: bool = True) -> dict[str, float]:
    """Accuracy and macro-F1 (classification) or mean token loss and perplexity (causal LM)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator(data, tokenizer))
    device = next(model.parameters()).device
    model.eval()
    predictions, losses, tokens = [], 0.0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            if data.task == "classification":
                predictions += out.logits.argmax(-1).tolist()
            else:
                n = int((batch["labels"][:, 1:] != -100).sum())
                losses += float(out.loss) * n
                tokens += n
    if data.task != "classification":
        loss = losses / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    labels = data.eval_labels
    accuracy = sum(p == t for p, t in zip(predictions, labels)) / len(labels)
    f1s = []
    for c in range(data.num_labels):
        tp = sum(p == c and t == c for p, t in zip(predictions, labels))
        fp = sum(p == c and t != c for p, t in zip(predictions, labels))
        fn = sum(p != c and t == c for p, t in zip(predictions, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "f1": sum(f1s) / len(f1s), "majority": data.majority_rate()}


class Timeline:
    """A TrainerCallback recording, before each optimizer step, what trains in it: the trainable
    parameters and every layer's mode. Its last record is what trained at the end of the run (a
    decision at the run's last step changes modes that never train, and is reported as such). At
    the start of training it empties ``recording``'s list: the fingerprinted batches are the
    training order, not the scoring pass's read of the first batch."""

    def __init__(self, opt: Any, recording: "RecordingCollator | None" = None) -> None:
        from transformers import TrainerCallback

        from ..integrations.hf import mode_line

        class _Callback(TrainerCallback):
            def on_train_begin(inner, args, state, control, **kwargs):  # noqa: N805
                if self.recording is not None:  # runs after AdaptoptCallback's scoring pass read the first batch
                    self.recording.batches.clear()

            def on_step_begin(inner, args, state, control, **kwargs):  # noqa: N805
                self.record(state.global_step + 1)

            def on_step_end(inner, args, state, control, **kwargs):  # noqa: N805
                bar = getattr(self.progress, "training_bar", None)
                if bar is not None and self.opt.history and self.opt.history[-1]["step"] == state.global_step:
                    bar.set_postfix_str(mode_line(self.opt), refresh=False)  # the counts, after a decision

        self.opt, self.callback, self.recording = opt, _Callback(), recording
        self.steps: list[dict[str, Any]] = []
        self.progress: Any = None  # the Trainer's progress callback: its bar shows the mode counts

    def record(self, step: int) -> None:
        self.steps.append({"step": step, "trainable": self.opt.trainable_parameter_count(),
                           "modes": [m.mode.value for m in self.opt.layers.values()],
                           "ranks": [m.rank for m in self.opt.layers.values()]})

    def untrained_decisions(self) -> list[dict[str, Any]]:
        """Transitions made after the last step began: they never trained."""
        last = self.steps[-1]["step"] if self.steps else 0
        return [h for h in self.opt.history if h["step"] >= last and h["reason"] != "initial"]


def _digest(*parts: Any) -> str:
    """A short fingerprint of tensors, lists and strings (to check that runs were paired)."""
    import hashlib

    import torch
    h = hashlib.sha1()
    for part in parts:
        if torch.is_tensor(part):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:12]


class RecordingCollator:
    """The data collator, fingerprinting the first ``first`` training batches it builds (the
    data order every method of a seed must share)."""

    def __init__(self, collate: Any, first: int = 4) -> None:
        self.collate, self.first, self.batches = collate, first, []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.collate(features)
        if len(self.batches) < self.first:
            self.batches.append(_digest(batch["input_ids"]))
        return batch


def train_run(config: Mapping[str, Any], method_cfg: Mapping[str, Any], seed: int, run_dir: Path, *,
              progress: bool = True, save: bool = True, built: tuple | None = None,
              split: str = "test") -> dict[str, Any]:
    """Train, evaluate, and write this run's files into ``run_dir``; returns the result row.

    ``split="validation"`` trains on the training side minus a validation part and evaluates
    on that part (the test side is never read); the row records which."""
    import torch
    from transformers import Trainer, TrainingArguments

    from adaptopt import export_merged, save_adapters

    from ..integrations.hf import AdaptoptCallback
    from .host_memory import keep_freed_memory
    from .report import plot_run
    host_malloc = keep_freed_memory()
    data, model, tokenizer, opt = built or build(config, method_cfg, seed, split=split)
    head = [p for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score")]
    head_digest = _digest(*head) if head else ""
    training = config["training"]
    run_dir.mkdir(parents=True, exist_ok=True)
    train_rows = tokenized(data, tokenizer, training["max_length"], "train")
    eval_rows = tokenized(data, tokenizer, training["max_length"], "eval")
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=training["batch_size"],
        num_train_epochs=training["epochs"], max_steps=training["max_steps"], learning_rate=opt.lr,
        lr_scheduler_type="linear", warmup_steps=float(training["warmup_ratio"]),
        logging_steps=training["logging_steps"],
        gradient_accumulation_steps=training["gradient_accumulation_steps"], max_grad_norm=training["max_grad_norm"],
        save_strategy="no", eval_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress, dataloader_num_workers=0)
    recording = RecordingCollator(collator(data, tokenizer))
    timeline = Timeline(opt, recording)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=recording,
                      optimizers=(opt, None), callbacks=[AdaptoptCallback(), timeline.callback])
    timeline.progress = next((c for c in trainer.callback_handler.callbacks if hasattr(c, "training_bar")), None)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    metrics = evaluate(model, eval_rows, data, tokenizer, training["eval_batch_size"], progress)
    if not timeline.steps:
        timeline.record(0)  # a run of no step: what would have trained
    counts = [s["trainable"] for s in timeline.steps]
    modes_end = {m: timeline.steps[-1]["modes"].count(m) for m in ("full", "lora", "frozen")}
    untrained = timeline.untrained_decisions()
    if untrained:
        print(f"adaptopt: the decision at step {untrained[0]['step']}, the run's last, moved {len(untrained)} layer(s) "
              "that never trained after it; the report gives the modes that trained", file=sys.stderr)
    result = {"method": method_cfg["label"], "seed": seed, **metrics, "wall_time_s": wall,
              "trainable_start": counts[0], "trainable_mean": sum(counts) / len(counts), "trainable_end": counts[-1],
              "modes_end": modes_end, "untrained_transitions": len(untrained),
              "total_params": sum(p.numel() for p in model.parameters()), "peak_rss_mb": peak_rss_mb(),
              "steps": opt.step_count, "train_examples": len(train_rows), "eval_examples": len(eval_rows),
              "split": split, "lr": opt.lr, "lora_lr": opt.lora_lr, "data_order": _digest(recording.batches),
              "eval_set": _digest(data.eval_texts, data.eval_labels), "initial_head": head_digest,
              "data_notes": list(data.notes), "host_malloc": host_malloc,
              "run_dir": str(run_dir)}
    decisions = {"layers": list(opt.layers), "output_adapter": opt.output_adapter, "history": opt.history,
                 "score_log": opt.score_log,
                 "timeline": timeline.steps, "policy": opt.policy.config()}
    (run_dir / "decisions.json").write_text(json.dumps(decisions, indent=1, default=str))
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    if data.label_names:  # what each class index means (also id2label in merged/config.json)
        (run_dir / "labels.json").write_text(json.dumps(dict(enumerate(data.label_names)), indent=1))
    plot_run(decisions, run_dir, title=f"{method_cfg['label']} (seed {seed})")
    if save:
        save_adapters(model, run_dir / "adapters")
        export_merged(model, run_dir / "merged", tokenizer=tokenizer)
    return result


def _child(config: Mapping[str, Any], method_cfg: Mapping[str, Any], seed: int, run_dir: str,
           split: str) -> dict[str, Any]:
    from .config import load_plugins
    load_plugins(config.get("plugins"), config.get("source", "<config>"))  # a fresh process registers them again
    return train_run(config, method_cfg, seed, Path(run_dir), save=False, split=split)


def compare_runs(config: Mapping[str, Any], out: Path, split: str = "test",
                 fresh_process: bool = True) -> list[dict[str, Any]]:
    """Every (method, seed) of the config, each in a fresh process (so each run's peak memory is
    its own; ``fresh_process=False`` runs them here, for tests); returns the result rows."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    rows = []
    grid = [(m, s) for m in config["methods"] for s in config["seeds"]]
    for i, (method_cfg, seed) in enumerate(grid, 1):
        run_dir = out / "runs" / f"{_slug(method_cfg['label'])}-seed{seed}"
        print(f"[{i}/{len(grid)}] {method_cfg['label']}, seed {seed} → {run_dir}", flush=True)
        if not fresh_process:
            rows.append(_child(config, method_cfg, seed, str(run_dir), split))
            continue
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(_child, dict(config), dict(method_cfg), seed, str(run_dir), split).result())
    return rows


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").lower()
