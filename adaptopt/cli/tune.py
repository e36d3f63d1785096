"""``adaptopt tune``: learning rates chosen on a validation split, never on the test side.

Each parameter kind gets its own small grid (``tune.lr`` for full weights and everything that
is not an adapter factor, ``tune.lora_lr`` for LoRA factors; three values each by default).
Full fine-tuning runs over the ``lr`` grid and LoRA (the config's ``fine_tuning.lora`` section)
over the ``lora_lr`` grid, each on ``tune.seeds``, trained on the training side minus a
validation part (``data.validation_fraction`` of the training groups, 0.15 by default) and
scored on that part (:func:`adaptopt.cli.data.load_data` with ``split="validation"``:
the test side's texts and labels are never read). The best value of each grid — highest mean
accuracy, or lowest perplexity — is what every method then runs with.
"""
from __future__ import annotations

import json
import statistics
from datetime import date
from pathlib import Path
from typing import Any, Mapping

from .paired import LOWER_IS_BETTER


def grid_methods(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The runs of the selection: Full at each ``lr``, LoRA at each ``lora_lr``."""
    lora = dict(config["fine_tuning"].get("lora") or {})
    runs = [{"method": "full", "lr": v, "label": f"full lr={v:g}", "kind": "lr", "value": v}
            for v in config["tune"]["lr"]]
    runs += [{"method": "lora", "lora": lora, "lora_lr": v, "label": f"lora lora_lr={v:g}", "kind": "lora_lr",
              "value": v} for v in config["tune"]["lora_lr"]]
    return runs


def choose(rows: list[Mapping[str, Any]], methods: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The best value per parameter kind from the validation rows."""
    metric = next(k for k in ("accuracy", "perplexity", "loss") if k in rows[0])
    sign = -1 if metric in LOWER_IS_BETTER else 1
    scores: dict[str, dict[float, float]] = {}
    for m in methods:
        values = [float(r[metric]) for r in rows if r["method"] == m["label"]]
        scores.setdefault(m["kind"], {})[m["value"]] = statistics.fmean(values)
    chosen = {kind: max(grid, key=lambda v: (sign * grid[v], -v)) for kind, grid in scores.items()}
    return {"metric": metric, "chosen": chosen, "validation": scores}


def run_tune(config: dict[str, Any], fresh_process: bool = True) -> dict[str, Any]:
    """Run the selection, write ``tuned.json`` and ``tuned.md`` to the output directory, print them."""
    from .runner import compare_runs
    methods = grid_methods(config)
    out = Path(config["output_dir"])
    grid_config = {**config, "methods": methods, "seeds": config["tune"]["seeds"]}
    rows = compare_runs(grid_config, out, split="validation", fresh_process=fresh_process)
    result = choose(rows, methods)
    result.update(seeds=config["tune"]["seeds"], date=date.today().isoformat(), source=config["source"],
                  validation_examples=rows[0]["eval_examples"], train_examples=rows[0]["train_examples"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuned.json").write_text(json.dumps(result, indent=1))
    lines = [f"| parameter kind | {result['metric']} on validation per value | chosen |", "|---|---|---|"]
    for kind, grid in result["validation"].items():
        cells = ", ".join(f"{v:g}: {s:.4f}" for v, s in sorted(grid.items()))
        lines.append(f"| {kind} | {cells} | **{result['chosen'][kind]:g}** |")
    table = "\n".join(lines)
    (out / "tuned.md").write_text(table + "\n")
    print(f"\nlearning rates chosen on {result['validation_examples']} validation examples carved from the "
          f"training side (seeds {result['seeds']}; the test side was not read):")
    print(table)
    print(f"\nfor the config (adaptopt tune {config['source']}, {result['date']}):\n"
          f"  training: {{lr: {result['chosen']['lr']:g}, lora_lr: {result['chosen']['lora_lr']:g}}}")
    return result
