r"""``adaptopt suite``: methods × tasks × paired seeds, the table the seeds' papers print, and the
default chosen from it on validation splits only (docs/cli.md, "The task suite").

A suite file lists ``tasks`` (each a run config's ``model`` / ``data`` / ``training``, labelled by
``name``; a top-level ``training`` is the base every task's own updates), ``methods`` (as
``compare.methods``; ``twin: true`` adds the method's *static twin*) and ``seeds``. Every task runs
every method at every seed (:func:`adaptopt.cli.runner.compare_runs`: same data order, initial head
and evaluation set per seed). A static twin runs, at each seed, the assignment its adaptive run
reached — every layer's mode in the last step — from step 0, with the same late freezes
(:func:`~adaptopt.cli.twins.static_twin`, a :class:`~adaptopt.Scheduled` plan).

Per task, for method ``m`` against LoRA ``L`` and Full ``F`` (means over the paired seeds):

.. math::  \text{share of Full's lead} = \frac{\bar m - \bar L}{\bar F - \bar L}

beside the paired difference to LoRA with its 95% interval (:mod:`adaptopt.cli.paired`), and per
method the training time and peak memory relative to LoRA's. With ``--split validation`` the
training side's validation part stands in for the test split (whose texts and labels are then never
read), and ``--choose`` picks the default among ``candidates`` by :func:`choose_default`.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError, load_yaml, normalise
from .paired import LOWER_IS_BETTER, paired_differences, reference
from .twins import static_twin, twin_method

SUITE_KEYS = {"name", "tasks", "methods", "seeds", "training", "default", "candidates", "output_dir",
              "clear_lead", "plugins", "benchmark"}
TASK_KEYS = {"name", "model", "data", "training"}
CLEAR_LEAD = {"accuracy": 0.02, "perplexity": 0.02}  # "Full leads LoRA": 2 points; 2 % of LoRA's perplexity


def load_suite(path: str | Path, output_dir: str | None = None) -> dict[str, Any]:
    """The suite file, every task validated as a run config with the suite's methods."""
    raw = load_yaml(path)
    source = str(path)
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(SUITE_KEYS)}")
    for key in ("tasks", "methods"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise ConfigError(f"{source}: {key}: expected a non-empty list")
    twins = [i for i, m in enumerate(raw["methods"]) if isinstance(m, Mapping) and m.get("twin")]
    methods = [{k: v for k, v in m.items() if k != "twin"} if isinstance(m, Mapping) else m for m in raw["methods"]]
    tasks = []
    for i, task in enumerate(raw["tasks"]):
        if not isinstance(task, Mapping) or not task.get("name"):
            raise ConfigError(f"{source}: tasks[{i}]: expected a mapping with a name, model, data and training")
        extra = sorted(set(task) - TASK_KEYS)
        if extra:
            raise ConfigError(f"{source}: tasks[{i}] ({task['name']}): unknown key(s) {extra}; expected some of "
                              f"{sorted(TASK_KEYS)}")
        run = {"name": task["name"], "model": task.get("model"), "data": task.get("data"),
               "training": {**(raw.get("training") or {}), **(task.get("training") or {})},
               "compare": {"methods": methods, "seeds": raw.get("seeds", [0, 1, 2])},
               "plugins": raw.get("plugins"),
               "output_dir": str(Path(output_dir or raw.get("output_dir") or "runs/suite") / task["name"])}
        tasks.append(normalise({k: v for k, v in run.items() if v is not None}, f"{source}: tasks[{i}]"))
    labels = [m["label"] for m in tasks[0]["methods"]]
    for key in ("lora", "full"):
        if reference(labels, key) is None:
            raise ConfigError(f"{source}: methods: the suite measures against LoRA and Full; list a {key!r} method")
    for key in ("default",) if raw.get("default") else ():
        if raw[key] not in labels:
            raise ConfigError(f"{source}: default: {raw[key]!r} is not a method label ({labels})")
    candidates = list(raw.get("candidates") or [])
    missing = [c for c in candidates if c not in labels]
    if missing:
        raise ConfigError(f"{source}: candidates: {missing} are not method labels ({labels})")
    if len({t["name"] for t in tasks}) != len(tasks):
        raise ConfigError(f"{source}: tasks: names must be distinct")
    runnable = labels + [f"{labels[i]} twin" for i in twins]
    benchmark = raw.get("benchmark")
    if benchmark is not None and (not isinstance(benchmark, list) or not benchmark
                                  or any(label not in runnable for label in benchmark)):
        raise ConfigError(f"{source}: benchmark: expected a non-empty list of method labels (twins as "
                          f"'<label> twin') of {runnable}, got {benchmark!r}")
    return {"name": raw.get("name", Path(path).stem), "source": source, "tasks": tasks, "benchmark": benchmark,
            "runnable": runnable, "twins": [labels[i] for i in twins], "default": raw.get("default"),
            "candidates": candidates,
            "output_dir": str(output_dir or raw.get("output_dir") or "runs/suite"),
            "clear_lead": {**CLEAR_LEAD, **(raw.get("clear_lead") or {})}}


# --------------------------------------------------------------------------- running
def methods_to_run(suite: Mapping[str, Any], requested: str | None) -> list[str] | None:
    """The method labels a run of the suite runs: ``requested`` (comma-separated, twins as
    ``"<label> twin"``; ``"all"``: every method, returned as ``None``), or without it the file's
    ``benchmark`` — the methods the goals need, sized to the time a run of the whole suite is meant to
    take — or every method if the file names none."""
    if requested is None:
        return list(suite["benchmark"]) if suite.get("benchmark") else None
    if requested == "all":
        return None
    methods = requested.split(",")
    unknown = sorted(set(methods) - set(suite["runnable"]))
    if unknown:
        raise ConfigError(f"suite: --methods {unknown}: not method labels of {suite['source']} "
                          f"({suite['runnable']}, or 'all')")
    return methods


def run_suite(suite: Mapping[str, Any], split: str = "test", fresh_process: bool = True,
              only: Sequence[str] | None = None, methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every task (or those named in ``only``) × method (or those labelled in ``methods``) × seed,
    then every twin of a method run; the rows carry their ``task``, and each task's rows are saved as
    it ends (``<task>/rows-<split>.json``), so a suite can run in parts and be reported whole
    (:func:`saved_rows`). With ``methods`` (twins named ``"<label> twin"``), the task's saved rows of
    other (method, seed) pairs stay."""
    from .runner import compare_runs
    rows: list[dict[str, Any]] = []
    for task in suite["tasks"]:
        if only and task["name"] not in only:
            continue
        out = Path(task["output_dir"])
        print(f"\n== task {task['name']} ({split} split) → {out}", flush=True)
        chosen = [m for m in task["methods"] if not methods or m["label"] in methods]
        task_rows = compare_runs({**task, "methods": chosen}, out, split=split, fresh_process=fresh_process)
        saved = out / f"rows-{split}.json"
        kept = json.loads(saved.read_text()) if methods and saved.is_file() else []
        by_label = {m["label"]: m for m in task["methods"]}
        from adaptopt.policies import build_policy  # the twins' policies (torch only once twins run)
        for label in [t for t in suite["twins"] if (f"{t} twin" in methods if methods else t in by_label)]:
            ran = task_rows if any(r["method"] == label for r in task_rows) else kept
            adaptive = [r for r in ran if r["method"] == label and r["seed"] in task["seeds"]]
            if not adaptive:
                raise ConfigError(f"suite: {label} twin: task {task['name']} has no {split} run of {label!r} to "
                                  f"repeat; run it too (--methods {label},{label} twin)")
            for row in adaptive:
                decisions = json.loads((Path(row["run_dir"]) / "decisions.json").read_text())
                twin = twin_method(by_label[label], static_twin(decisions), bool(decisions.get("output_adapter")),
                                   build_policy(decisions["policy"]).trainable_extra())
                twin_config = {**task, "methods": [twin], "seeds": [row["seed"]]}
                task_rows += compare_runs(twin_config, out, split=split, fresh_process=fresh_process)
        ran_pairs = {(r["method"], r["seed"]) for r in task_rows}
        task_rows = [r for r in kept if (r["method"], r["seed"]) not in ran_pairs] + \
            [{**r, "task": task["name"]} for r in task_rows]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rows-{split}.json").write_text(json.dumps(task_rows, indent=1))
        rows += task_rows
    return rows


def saved_rows(suite: Mapping[str, Any], split: str, only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows every task of ``suite`` (or those named in ``only``) saved for ``split``; a task not
    run yet is named."""
    rows = []
    for task in [t for t in suite["tasks"] if not only or t["name"] in only]:
        path = Path(task["output_dir"]) / f"rows-{split}.json"
        if not path.is_file():
            raise ConfigError(f"suite: task {task['name']!r} has no {split} results at {path}; run it "
                              f"(adaptopt suite FILE --split {split} --tasks {task['name']})")
        rows += json.loads(path.read_text())
    return rows


# --------------------------------------------------------------------------- the table
def metric_of(rows: Sequence[Mapping[str, Any]]) -> str:
    return next(k for k in ("accuracy", "perplexity", "loss") if k in rows[0])


def task_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method of one task: mean metric, Δ vs LoRA (interval), share of Full's lead, time and
    memory relative to LoRA."""
    metric = metric_of(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lora, full = reference(methods, "lora"), reference(methods, "full")
    means = {m: statistics.fmean(float(r[metric]) for r in rows if r["method"] == m) for m in methods}
    cost = {key: {m: statistics.fmean(float(r.get(key, math.nan)) for r in rows if r["method"] == m) for m in methods}
            for key in ("wall_time_s", "peak_rss_mb", "flops_per_step")}
    diffs = paired_differences(rows, metric, lora)
    lead = means[full] - means[lora]
    return {m: {"metric": metric, "mean": means[m], "vs_lora": diffs.get(m),
                "share": (means[m] - means[lora]) / lead if lead else math.nan, "full_lead": lead,
                "lora_mean": means[lora],
                "time": cost["wall_time_s"][m] / cost["wall_time_s"][lora],
                "memory": cost["peak_rss_mb"][m] / cost["peak_rss_mb"][lora],
                "flops": cost["flops_per_step"][m] / cost["flops_per_step"][lora]} for m in methods}


def clearly_led(summary: Mapping[str, Mapping[str, Any]], clear_lead: Mapping[str, float]) -> bool:
    """Does Full lead LoRA clearly on this task (by ``clear_lead``: points of accuracy, or a share
    of LoRA's perplexity)?"""
    any_row = next(iter(summary.values()))
    metric, lead = any_row["metric"], any_row["full_lead"]
    if metric in LOWER_IS_BETTER:
        return -lead > clear_lead.get(metric, 0.02) * any_row["lora_mean"]
    return lead > clear_lead.get(metric, 0.02)


def below(d: Mapping[str, float] | None, metric: str) -> bool:
    """Is a paired difference worse than zero beyond its interval?"""
    if d is None or math.isnan(d["lo"]):
        return False
    return d["lo"] > 0 if metric in LOWER_IS_BETTER else d["hi"] < 0


def _cell(s: Mapping[str, Any]) -> str:
    scale = 100.0 if s["metric"] in ("accuracy", "f1") else 1.0
    d = s["vs_lora"]
    if d is None:
        return "–"
    ci = "" if math.isnan(d["lo"]) else f" [{scale * d['lo']:+.2f}, {scale * d['hi']:+.2f}]"
    share = "" if math.isnan(s["share"]) else f" · {100 * s['share']:.0f}%"
    return f"{scale * s['mean']:.2f} ({scale * d['mean']:+.2f}{ci}){share}"


def suite_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A row per method, a column per task (metric, Δ vs LoRA [95% CI] · share of Full's lead), then
    time, FLOPs per step (estimated from each run's timeline; "–" where a row has none) and peak
    memory relative to LoRA, averaged over the tasks."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    summaries = {t: task_summary([r for r in rows if r["task"] == t]) for t in tasks}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = ["method"] + [f"{t} ({next(iter(summaries[t].values()))['metric']})" for t in tasks]
    header += ["time / LoRA", "FLOPs / LoRA", "memory / LoRA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        cells = [m] + [_cell(summaries[t][m]) if m in summaries[t] else "–" for t in tasks]
        present = [summaries[t][m] for t in tasks if m in summaries[t]]
        flops = statistics.fmean(s["flops"] for s in present)
        cells += [f"{statistics.fmean(s['time'] for s in present):.2f}", "–" if math.isnan(flops) else f"{flops:.2f}",
                  f"{statistics.fmean(s['memory'] for s in present):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- goals and the choice
def static_methods(methods: Sequence[str], adaptive: Sequence[str]) -> list[str]:
    """The suite's static methods: everything but Full and the adaptive ones (twins are static)."""
    full = reference(methods, "full")
    return [m for m in methods if m != full and m not in adaptive]


def goals(rows: Sequence[Mapping[str, Any]], method: str, adaptive: Sequence[str],
          clear_lead: Mapping[str, float]) -> dict[str, Any]:
    """The issue's goals for ``method`` on these rows: never below LoRA beyond the interval; the mean
    share of Full's lead where Full leads clearly; never below the best static method beyond the
    interval — checked against *every* static method, so a static method with a narrow lead is not
    hidden behind a better-by-mean one with a wide interval (``best_static`` names the one it is
    below, else the best by mean); mean time relative to LoRA."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out: dict[str, Any] = {"method": method, "tasks": {}, "missing": []}
    shares, times = [], []
    for t in tasks:
        task_rows = [r for r in rows if r["task"] == t]
        summary = task_summary(task_rows)
        if method not in summary:
            out["missing"].append(t)
            continue
        s = summary[method]
        sign = -1 if s["metric"] in LOWER_IS_BETTER else 1
        means = {m: sign * summary[m]["mean"] for m in static_methods(list(summary), adaptive) if m != method}
        statics = sorted(means, key=means.__getitem__, reverse=True)  # best first
        vs = {m: paired_differences(task_rows, s["metric"], m).get(method) for m in statics}
        beaten_by = [m for m in statics if below(vs[m], s["metric"])]
        best = (beaten_by or statics or [method])[0]  # a narrower loss is not hidden behind a wider best
        vs_best = vs.get(best)
        led = clearly_led(summary, clear_lead)
        if led:
            shares.append(s["share"])
        times.append(s["time"])
        out["tasks"][t] = {"below_lora": below(s["vs_lora"], s["metric"]), "share": s["share"], "full_leads": led,
                           "best_static": best, "vs_best_static": vs_best,
                           "below_best_static": bool(beaten_by),
                           "time": s["time"], "memory": s["memory"]}
    out["never_below_lora"] = not any(v["below_lora"] for v in out["tasks"].values())
    out["never_below_best_static"] = not any(v["below_best_static"] for v in out["tasks"].values())
    out["mean_share_where_full_leads"] = statistics.fmean(shares) if shares else math.nan
    out["mean_time"] = statistics.fmean(times) if times else math.nan
    return out


def choose_default(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str],
                   clear_lead: Mapping[str, float]) -> dict[str, Any]:
    """The default among ``candidates``, from (validation) rows: of those never below LoRA beyond
    the interval and at most LoRA's mean time, the one with the largest mean share of Full's lead
    where Full leads clearly (ties: the faster); if none qualifies, the one that fails least (first
    below LoRA on fewest tasks, then the share). Returns the choice and every candidate's goals.
    Every candidate must have rows on every task (shares over different tasks do not compare):
    otherwise a ``ConfigError`` names the missing pairs and nothing is chosen."""
    report = {c: goals(rows, c, candidates, clear_lead) for c in candidates}
    missing = {c: g["missing"] for c, g in report.items() if g["missing"]}
    if missing:
        raise ConfigError("suite --choose: candidates without rows on every task: "
                          + "; ".join(f"{c} on {', '.join(ts)}" for c, ts in missing.items())
                          + " — run them (--methods, --tasks) or choose on the tasks they ran (--tasks)")

    def share(c: str) -> float:
        v = report[c]["mean_share_where_full_leads"]
        return -math.inf if math.isnan(v) else v

    qualified = [c for c in candidates if report[c]["never_below_lora"] and report[c]["mean_time"] <= 1.0]
    if qualified:
        chosen = max(qualified, key=lambda c: (share(c), -report[c]["mean_time"]))
    else:
        chosen = max(candidates, key=lambda c: (-sum(v["below_lora"] for v in report[c]["tasks"].values()),
                                                share(c), -report[c]["mean_time"]))
    return {"chosen": chosen, "qualified": qualified, "candidates": report}


def goals_table(report: Mapping[str, Any]) -> str:
    """The goals of each reported method, one row each, naming the tasks where a goal fails; methods
    without rows on this split are listed under the table, not scored."""
    def verdict(g: Mapping[str, Any], key: str, against: str | None = None) -> str:
        failed = [f"{t} (vs {v[against]})" if against else t for t, v in g["tasks"].items() if v[key]]
        return "no: " + ", ".join(failed) if failed else "yes"

    lines = ["| method | never below LoRA | share of Full's lead where it leads clearly | never below the best static "
             "| mean time / LoRA |", "|---|---|---|---|---|"]
    for name, g in report.items():
        if g["tasks"]:
            share = g["mean_share_where_full_leads"]
            shown = "– (Full leads clearly on none of its tasks)" if math.isnan(share) else f"{100 * share:.0f}%"
            label = f"{name} (no rows on {', '.join(g['missing'])})" if g["missing"] else name
            lines.append(f"| {label} | {verdict(g, 'below_lora')} | {shown} | "
                         f"{verdict(g, 'below_best_static', 'best_static')} | {g['mean_time']:.2f} |")
    unmeasured = [name for name, g in report.items() if not g["tasks"]]
    if unmeasured:
        lines += ["", f"no rows on this split: {', '.join(unmeasured)}"]
    return "\n".join(lines)


def write_suite(rows: Sequence[Mapping[str, Any]], suite: Mapping[str, Any], split: str,
                choose: bool) -> dict[str, Any]:
    """Write ``rows.json``, ``suite.md`` (the table and the goals), a Pareto plot per task and, with
    ``choose``, ``chosen.json``; print the table. Returns what was reported."""
    from .report import plot_pareto
    from .run_flops import with_flops
    rows = with_flops(list(rows), {t["name"]: t for t in suite.get("tasks", ())})
    choice = choose_default(rows, suite["candidates"], suite["clear_lead"]) if choose else None  # may refuse: first
    out = Path(suite["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rows-{split}.json").write_text(json.dumps(list(rows), indent=1))
    for task in dict.fromkeys(r["task"] for r in rows):
        plot_pareto([r for r in rows if r["task"] == task], out / f"pareto-{task}-{split}.png")
    table = suite_table(rows)
    adaptive = list(suite["candidates"]) or [m for m in [suite["default"]] if m]
    reported = {m: goals(rows, m, adaptive, suite["clear_lead"]) for m in dict.fromkeys(
        [*([suite["default"]] if suite["default"] else []), *suite["candidates"]])}
    seeds = sorted({r["seed"] for r in rows})
    text = [f"# {suite['name']}: {split} split, seeds {seeds}", "",
            "Each cell: the metric (accuracy in points, or perplexity), its paired difference to LoRA with the "
            "95% interval, and the share of Full's lead it captures.", "", table]
    result: dict[str, Any] = {"split": split, "goals": reported}
    if reported:
        text += ["", goals_table(reported)]
    if choice is not None:
        result["choice"] = choice
        (out / "chosen.json").write_text(json.dumps(result["choice"], indent=1, default=str))
        text += ["", f"chosen on the {split} split among {suite['candidates']}: **{result['choice']['chosen']}** "
                 f"(qualified: {result['choice']['qualified'] or 'none'})"]
    (out / f"suite-{split}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"\nwritten to {out}: rows-{split}.json, suite-{split}.md, pareto-<task>-{split}.png"
          + (", chosen.json" if choose else ""))
    return result
