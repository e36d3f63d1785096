"""Paired comparisons over seeds: what ``adaptopt compare`` reports to see a one-point difference.

At seed ``k`` every method trains on the same data order, from the same initial head, and is
evaluated on the same examples (the runner records digests of all three), so per-seed
differences cancel most of what varies between seeds. For a method ``M`` and a reference ``R``:

.. math::  d_k = m_{M,k} - m_{R,k},\\qquad \\bar d \\pm t_{0.975,\\,n-1}\\,\\frac{s_d}{\\sqrt n}

the mean paired difference with its 95% **paired-t** interval over the ``n`` seeds (``s_d``: the
standard deviation of the ``d_k``). Against the straight line from LoRA to Full in (cost,
metric) — cost = training time or peak memory — the same is done with

.. math::  e_k = m_{M,k} - \\Big(m_{L,k} + (m_{F,k} - m_{L,k})\\,\\frac{c_M - c_L}{c_F - c_L}\\Big)

(``c``: the methods' mean costs). A method **pays** when the whole interval of ``e`` lies on the
better side of the line (above for accuracy, below for perplexity). Plain Python, no numpy.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

# two-sided 95% quantiles of Student's t, by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
LOWER_IS_BETTER = ("perplexity", "loss")


def t_quantile(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (1.96 beyond the table)."""
    if df < 1:
        raise ValueError("an interval needs at least two paired seeds")
    known = [d for d in T_975 if d <= df]
    return T_975[max(known)] if df <= 120 else 1.96


def interval(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "lo", "hi", "n"}``: the mean with its 95% t-interval (``lo = hi = nan`` for n < 2)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n}
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def by_seed(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[int, float]]:
    """``{method: {seed: row[key]}}``."""
    table: dict[str, dict[int, float]] = {}
    for row in rows:
        table.setdefault(row["method"], {})[int(row["seed"])] = float(row[key])
    return table


def reference(methods: Sequence[str], name: str) -> str | None:
    """The method that stands for ``"full"`` or ``"lora"`` (first whose label starts with it)."""
    return next((m for m in methods if m == name or m.startswith(name + " ")), None)


def paired_differences(rows: Sequence[Mapping[str, Any]], metric: str, ref: str) -> dict[str, dict[str, float]]:
    """Each method's paired difference to ``ref`` over the seeds both ran."""
    table = by_seed(rows, metric)
    out = {}
    for method, values in table.items():
        seeds = sorted(set(values) & set(table[ref]))
        if seeds:
            out[method] = interval([values[s] - table[ref][s] for s in seeds])
    return out


def line_gap(rows: Sequence[Mapping[str, Any]], metric: str, cost: str, lora: str, full: str
             ) -> dict[str, dict[str, float]]:
    """Each method's paired distance above the LoRA–Full line at its own mean ``cost``."""
    values, costs = by_seed(rows, metric), by_seed(rows, cost)
    mean_cost = {m: statistics.fmean(c.values()) for m, c in costs.items()}
    span = mean_cost[full] - mean_cost[lora]
    out = {}
    for method, per_seed in values.items():
        seeds = sorted(set(per_seed) & set(values[lora]) & set(values[full]))
        if not seeds or span == 0:
            continue
        w = (mean_cost[method] - mean_cost[lora]) / span
        out[method] = interval([per_seed[s] - (values[lora][s] + (values[full][s] - values[lora][s]) * w)
                                for s in seeds])
        out[method]["cost_fraction"] = w
    return out


def pays(gap: Mapping[str, float], metric: str) -> bool:
    """Is the whole interval on the better side of the line?"""
    if math.isnan(gap["lo"]):
        return False
    return gap["hi"] < 0 if metric in LOWER_IS_BETTER else gap["lo"] > 0


def _fmt(d: Mapping[str, float], scale: float) -> str:
    if math.isnan(d["lo"]):
        return f"{scale * d['mean']:+.2f} (n={d['n']})"
    return f"{scale * d['mean']:+.2f} [{scale * d['lo']:+.2f}, {scale * d['hi']:+.2f}]"


def paired_table(rows: Sequence[Mapping[str, Any]], metric: str, lrs: Mapping[str, str] | None = None) -> str:
    """The paired table in Markdown: per method the mean metric, differences to LoRA and Full, and
    the distance above the LoRA–Full line in time and in memory, each with its 95% interval."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lora, full = reference(methods, "lora"), reference(methods, "full")
    scale = 100.0 if metric in ("accuracy", "f1") else 1.0
    unit = "pt, " if scale == 100 else ""
    diffs = {name: paired_differences(rows, metric, ref) for name, ref in (("lora", lora), ("full", full)) if ref}
    gaps = {cost: line_gap(rows, metric, cost, lora, full) for cost in ("wall_time_s", "peak_rss_mb")
            if lora and full}
    values, times, memory = by_seed(rows, metric), by_seed(rows, "wall_time_s"), by_seed(rows, "peak_rss_mb")
    header = ["method", f"{metric} (mean)", "seeds", "time (s)", "peak RSS (MB)"]
    header += [f"Δ vs {n} ({unit}95% CI)" for n in diffs]
    header += [f"above LoRA–Full line, {'time' if c == 'wall_time_s' else 'memory'} ({unit}95% CI)" for c in gaps]
    if lrs:
        header.append("learning rates")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        cells = [m, f"{statistics.fmean(values[m].values()):.4f}", str(len(values[m])),
                 f"{statistics.fmean(times[m].values()):.0f}", f"{statistics.fmean(memory[m].values()):.0f}"]
        cells += [_fmt(d[m], scale) if m in d else "–" for d in diffs.values()]
        for gap in gaps.values():
            g = gap.get(m)
            cells.append("–" if g is None or m in (lora, full) else
                         _fmt(g, scale) + (" **pays**" if pays(g, metric) else ""))
        if lrs:
            cells.append(lrs.get(m, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
