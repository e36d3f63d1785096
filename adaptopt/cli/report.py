"""Results people look at: the comparison table and the plots of a run's decisions.

Plain Python (no torch); matplotlib is imported only when a plot is drawn (``[plot]`` extra).

- :func:`summarise` turns result rows (one per method × seed) into one row per method:
  mean ± std of each metric, wall time, trainable parameters (start / mean / end), peak RSS,
  and ratios to Full and to LoRA (metric and time);
- :func:`markdown_table` / :func:`write_tables` print and save it (Markdown, CSV, JSON);
- :func:`plot_run` draws a run's layer-importance heatmap (layers × decision steps), its mode
  timeline (trainable parameters and every layer's mode over steps) and its final ranks;
- :func:`plot_compare` draws trainable parameters against the metric across methods;
- :func:`plot_scan` draws ``adaptopt scan``'s SNR per layer (blocks × layer types), the
  selected layers marked.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

HEATMAP_KEYS = ("grad_norm", "signal_fraction", "signal_fraction_compat", "svd", "ce", "cs", "weight_norm",
                "act_rms")
MODE_CODES = {"frozen": 0, "lora": 1, "full": 2}


def _metric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = [k for k in ("accuracy", "f1", "perplexity", "loss") if k in rows[0]]
    return keys


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order) with means, stds and ratios to Full / LoRA."""
    if not rows:
        return []
    metrics = _metric_keys(rows)
    primary = metrics[0]
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = []
    for method, runs in by_method.items():
        entry: dict[str, Any] = {"method": method, "seeds": len(runs)}
        for key in metrics + ["wall_time_s", "peak_rss_mb", "trainable_start", "trainable_mean", "trainable_end"]:
            entry[key], entry[f"{key}_std"] = _mean_std([float(r[key]) for r in runs])
        entry["total_params"] = runs[0]["total_params"]
        if "majority" in runs[0]:
            entry["majority"] = runs[0]["majority"]
        summary.append(entry)
    references = {"full": next((s for s in summary if s["method"] == "full"), None),
                  "lora": next((s for s in summary if s["method"].startswith("lora")), None)}
    for entry in summary:
        for name, ref in references.items():
            entry[f"{primary}_vs_{name}"] = entry[primary] / ref[primary] if ref and ref[primary] else None
            entry[f"time_vs_{name}"] = entry["wall_time_s"] / ref["wall_time_s"] if ref else None
    return summary


def _fmt_count(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def markdown_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The seed-000-style comparison table."""
    if not summary:
        return "(no runs)"
    metrics = [k for k in ("accuracy", "f1", "perplexity", "loss") if k in summary[0]]
    primary = metrics[0]
    header = (["method"] + [f"{m} (mean ± std)" for m in metrics]
              + ["time (s)", "trainable start / mean / end", "peak RSS (MB)",
                 f"{primary} vs Full", "time vs Full", f"{primary} vs LoRA", "time vs LoRA"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        cells = ([s["method"]] + [f"{s[m]:.4f} ± {s[m + '_std']:.4f}" for m in metrics]
                 + [f"{s['wall_time_s']:.0f}",
                    " / ".join(_fmt_count(s[k]) for k in ("trainable_start", "trainable_mean", "trainable_end")),
                    f"{s['peak_rss_mb']:.0f}", _ratio(s[f"{primary}_vs_full"]), _ratio(s["time_vs_full"]),
                    _ratio(s[f"{primary}_vs_lora"]), _ratio(s["time_vs_lora"])])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(rows: Sequence[Mapping[str, Any]], out: Path) -> list[dict[str, Any]]:
    """``results.csv`` (one row per run), ``summary.json`` and ``summary.md``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with (out / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps({"runs": list(rows), "summary": summary}, indent=1, default=str))
    (out / "summary.md").write_text(markdown_table(summary) + "\n")
    return summary


# --------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'adaptopt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _short(name: str) -> str:
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0]:]) if digits else name


def heatmap_key(score_log: Iterable[Mapping[str, Any]]) -> str | None:
    """The score the heatmap shows: the first of :data:`HEATMAP_KEYS` the log holds."""
    present = {k for entry in score_log for values in entry["scores"].values() for k in values}
    return next((k for k in HEATMAP_KEYS if k in present), None)


def plot_run(decisions: Mapping[str, Any], out: Path, title: str = "") -> list[Path]:
    """``heatmap.png``, ``modes.png`` and ``ranks.png`` from a run's ``decisions.json`` content."""
    plt = _pyplot()
    layers = list(decisions["layers"])
    labels = [_short(n) for n in layers]
    written = []
    log = [e for e in decisions.get("score_log", []) if e["scores"]]
    key = heatmap_key(log)
    if key is not None:
        matrix = [[e["scores"].get(n, {}).get(key, float("nan")) for e in log] for n in layers]
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(log) + 3), max(3, 0.22 * len(layers) + 1)))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(log)), [str(e["step"]) for e in log], fontsize=7)
        ax.set_yticks(range(len(layers)), labels, fontsize=6)
        ax.set_xlabel("decision step")
        ax.set_title(f"layer importance ({key}) {title}", fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(out / "heatmap.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    timeline = decisions.get("timeline", [])
    if timeline:
        from matplotlib.colors import ListedColormap
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 3 + 0.18 * len(layers)), sharex=True,
                                          gridspec_kw={"height_ratios": [1, 2]})
        steps = [t["step"] for t in timeline]
        top.plot(steps, [t["trainable"] for t in timeline], drawstyle="steps-post")
        top.set_ylabel("trainable params")
        top.set_title(f"mode timeline {title}", fontsize=9)
        codes = [[MODE_CODES[t["modes"][i]] for t in timeline] for i in range(len(layers))]
        cmap = ListedColormap(["#d9d9d9", "#6baed6", "#e6550d"])
        bottom.imshow(codes, aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
        bottom.set_yticks(range(len(layers)), labels, fontsize=6)
        bottom.set_xlabel("optimizer step")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in cmap.colors]
        bottom.legend(handles, list(MODE_CODES), loc="upper right", fontsize=7, ncol=3)
        fig.tight_layout()
        written.append(out / "modes.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
        final = timeline[-1]
        fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(layers) + 2), 3))
        colors = {"frozen": "#d9d9d9", "lora": "#6baed6", "full": "#e6550d"}
        heights = [r if m == "lora" else 0 for m, r in zip(final["modes"], final["ranks"])]
        bars = ax.bar(range(len(layers)), heights, color=[colors[m] for m in final["modes"]])
        for bar, mode in zip(bars, final["modes"]):
            if mode != "lora":
                ax.annotate(mode, (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=5,
                            rotation=90)
        ax.set_xticks(range(len(layers)), labels, rotation=90, fontsize=5)
        ax.set_ylabel("LoRA rank at the end")
        ax.set_title(f"rank allocation {title}", fontsize=9)
        fig.tight_layout()
        written.append(out / "ranks.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_compare(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Trainable parameters (mean over training) against the primary metric, one point per method."""
    plt = _pyplot()
    metric = next(k for k in ("accuracy", "perplexity", "loss") if k in summary[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        ax.errorbar(s["trainable_mean"], s[metric], yerr=s[f"{metric}_std"], fmt="o", capsize=3)
        ax.annotate(s["method"], (s["trainable_mean"], s[metric]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if "majority" in summary[0]:
        ax.axhline(summary[0]["majority"], color="grey", linestyle=":", label="majority class")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (mean over training, log scale)")
    ax.set_ylabel(metric)
    ax.set_title("trainable parameters vs " + metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The metric against training time and against peak memory, one point per method with 95%
    intervals over seeds as error bars, and the straight line from LoRA to Full: a method pays
    where it sits above that line (below, for perplexity) beyond its interval. Points carry
    numbers, named in one key beside the plots (names at the points overlap where methods cluster)."""
    from .paired import by_seed, interval, line_gap, pays, reference
    plt = _pyplot()
    metric = next(k for k in ("accuracy", "perplexity", "loss") if k in rows[0])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lora, full = reference(methods, "lora"), reference(methods, "full")
    values = by_seed(rows, metric)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    paid: dict[str, list[str]] = {m: [] for m in methods}
    for ax, cost, label in ((axes[0], "wall_time_s", "training time (s)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        costs = by_seed(rows, cost)
        gaps = line_gap(rows, metric, cost, lora, full) if lora and full else {}
        for number, m in enumerate(methods, 1):
            y, x = interval(list(values[m].values())), interval(list(costs[m].values()))
            yerr = 0 if y["n"] < 2 else y["hi"] - y["mean"]
            xerr = 0 if x["n"] < 2 else x["hi"] - x["mean"]
            paying = m in gaps and m not in (lora, full) and pays(gaps[m], metric)
            if paying:
                paid[m].append("time" if cost == "wall_time_s" else "memory")
            ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, fmt="o", capsize=3,
                        color="tab:green" if paying else "tab:red" if m in (lora, full) else "tab:blue")
            ax.annotate(str(number), (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if lora and full:
            xs = [statistics.fmean(costs[m].values()) for m in (lora, full)]
            ys = [statistics.fmean(values[m].values()) for m in (lora, full)]
            ax.plot(xs, ys, "--", color="grey", linewidth=1, label="LoRA–Full line")
            ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
    key = [f"{i:>2}  {m}" + (f" (pays in {' and '.join(paid[m])})" if paid[m] else "")
           for i, m in enumerate(methods, 1)]
    fig.text(0.74, 0.5, "\n".join(key), fontsize=7, va="center", family="monospace")
    fig.suptitle(f"{metric} against cost (mean over {max(len(v) for v in values.values())} paired seeds, "
                 "95% intervals)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.73, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scan(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """``scan.png``: one cell per (layer type, block) coloured by its signal share (the SNR's
    scale-free part), a white dot on each layer the selection trains. ``rows`` as written to
    ``scan.json``: ``layer``, ``type``, ``block``, ``signal_fraction``, ``selected``."""
    plt = _pyplot()
    types = list(dict.fromkeys(str(r["type"]) for r in rows))
    blocks = sorted({-1 if r["block"] is None else int(r["block"]) for r in rows})
    column = {b: i for i, b in enumerate(blocks)}
    grid = [[float("nan")] * len(blocks) for _ in types]
    marks = []
    for r in rows:
        y, x = types.index(str(r["type"])), column[-1 if r["block"] is None else int(r["block"])]
        grid[y][x] = 100 * float(r["signal_fraction"])
        if r["selected"]:
            marks.append((x, y))
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(blocks) + 3), max(2.5, 0.4 * len(types) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if marks:
        ax.scatter(*zip(*marks), s=14, c="white", edgecolors="black", linewidths=0.5, label="selected (FULL)")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    ax.set_xticks(range(len(blocks)), ["–" if b < 0 else str(b) for b in blocks], fontsize=7)
    ax.set_yticks(range(len(types)), types, fontsize=7)
    ax.set_xlabel("block")
    fig.colorbar(image, ax=ax, label="signal %")
    ax.set_title(title or "Spectrum scan", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
