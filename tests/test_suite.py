"""The task suite: splits never mix (fingerprints of every shipped dataset); the default is chosen
without reading the test split (its labels poisoned, the choice and every validation figure stay);
a static twin runs exactly the assignment its adaptive run reached, with the same late freezes; the
table's share of Full's lead and the choice follow their definitions on made-up rows."""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from adaptopt.cli.config import ConfigError
from adaptopt.cli.data import REGISTRY, load_data
from adaptopt.cli.run_flops import with_flops
from adaptopt.cli.suite import (
    choose_default,
    goals,
    goals_table,
    load_suite,
    methods_to_run,
    run_suite,
    saved_rows,
    suite_table,
    task_summary,
)
from adaptopt.cli.suite import write_suite as report_suite
from adaptopt.cli.twins import static_twin, twin_method
from adaptopt.training.compute import estimate_compute
from tests.test_cli import tiny  # noqa: F401  (the fixture: a tiny BERT folder and a CSV)

yaml = pytest.importorskip("yaml")
AutoModelForSequenceClassification = pytest.importorskip("transformers").AutoModelForSequenceClassification


def write_suite(path, tiny, data_path=None, **extra):  # noqa: F811
    suite = {"name": "t", "seeds": [0, 1],
             "training": {"epochs": 1, "batch_size": 8, "lr": 3e-3, "lora_lr": 1e-2, "max_length": 16,
                          "max_steps": 8, "logging_steps": 4},
             "tasks": [{"name": "reviews", "model": {"path": str(tiny["model"])},
                        "data": {"path": str(data_path or tiny["data"]), "text_column": "review",
                                 "label_column": "sentiment", "group_column": "film"}}],
             "methods": ["full", {"method": "lora", "label": "lora", "lora": {"r": 4, "alpha": 8}},
                         {"method": "hybrid", "label": "hybrid", "hybrid": {"calibration_steps": 2}},
                         {"method": "automode", "label": "automode", "twin": True,  # freezes a prefix at step 6
                          "automode": {"u": 8, "t": 25, "granularity": "module", "score_steps": 2, "freeze_from": 2,
                                       "freeze_step": 25, "freeze_max": 25}}],
             "default": "hybrid", "candidates": ["hybrid", "lora"], "output_dir": str(path.parent / "out"), **extra}
    path.write_text(yaml.safe_dump(suite))
    return path


def timeline(run_dir):
    decisions = json.loads((run_dir / "decisions.json").read_text())
    return decisions["layers"], {s["step"]: s["modes"] for s in decisions["timeline"]}


def test_a_static_twin_runs_the_assignment_its_policy_reached_with_the_same_late_freezes(tiny, tmp_path):  # noqa: F811
    suite = load_suite(write_suite(tmp_path / "suite.yaml", tiny))
    rows = run_suite(suite, "test", fresh_process=False)
    assert {r["method"] for r in rows} == {"full", "lora", "hybrid", "automode", "automode twin"}
    for seed in (0, 1):
        adaptive = next(r for r in rows if r["method"] == "automode" and r["seed"] == seed)
        twin = next(r for r in rows if r["method"] == "automode twin" and r["seed"] == seed)
        layers, reached = timeline(Path(adaptive["run_dir"]))
        twin_layers, ran = timeline(Path(twin["run_dir"]))
        assert twin_layers == layers and sorted(ran) == sorted(reached)
        steps = sorted(reached)
        final = reached[steps[-1]]
        late = [i for i, m in enumerate(final) if m == "frozen" and any(reached[s][i] != "frozen" for s in steps)]
        assert late and "full" in final  # the prefix froze after training, some layers FULL: the twin repeats both
        for i, name in enumerate(layers):
            if i in late:
                frozen_from = min(s for s in steps if all(reached[t][i] == "frozen" for t in steps if t >= s))
                before = reached[max(s for s in steps if s < frozen_from)][i]
                assert [ran[s][i] for s in steps] == [before if s < frozen_from else "frozen" for s in steps], name
            else:
                assert all(ran[s][i] == final[i] for s in steps), name
        assert twin["data_order"] == adaptive["data_order"] and twin["initial_head"] == adaptive["initial_head"]
    # each run's FLOPs, priced from its own timeline: a twin computes what its run computed; LoRA and
    # Full what the estimate gives their policies for this model, batch and run length
    priced = {(r["method"], r["seed"]): r["flops_per_step"]
              for r in with_flops(rows, {t["name"]: t for t in suite["tasks"]})}
    assert all(priced[("automode twin", seed)] == priced[("automode", seed)] for seed in (0, 1))
    model = AutoModelForSequenceClassification.from_pretrained(tiny["model"])
    for method, rank in (("lora", 4), ("full", 8)):
        assert priced[(method, 0)] == estimate_compute(model, method, 8, 16, run_steps=8, rank=rank).per_step
    assert priced[("full", 0)] > priced[("automode", 0)] > 0
    # a part re-run (--methods): its rows replace their own; every other saved row stays as it was
    saved = Path(suite["tasks"][0]["output_dir"]) / "rows-test.json"
    before = {(r["method"], r["seed"]): r for r in json.loads(saved.read_text())}
    rerun = run_suite(suite, "test", fresh_process=False, methods=["lora", "automode twin"])
    assert {r["method"] for r in rerun} == {"full", "lora", "hybrid", "automode", "automode twin"}  # the whole task
    after = {(r["method"], r["seed"]): r for r in json.loads(saved.read_text())}
    assert sorted(after) == sorted(before)
    for key, row in after.items():
        assert (row == before[key]) == (key[0] not in ("lora", "automode twin")), key
    assert saved_rows(suite, "test", only=["reviews"]) == json.loads(saved.read_text())
    with pytest.raises(ConfigError, match="no validation results"):
        saved_rows(suite, "validation")


def test_static_twin_plans_from_a_timeline():
    """Records are taken as each step begins (step 1 first); b is frozen from step 4 on, i.e. after 3."""
    decisions = {"layers": ["a", "b", "c"], "timeline": [
        {"step": 1, "modes": ["lora", "lora", "lora"]}, {"step": 2, "modes": ["lora", "lora", "lora"]},
        {"step": 3, "modes": ["full", "lora", "lora"]}, {"step": 4, "modes": ["full", "frozen", "lora"]},
        {"step": 5, "modes": ["full", "frozen", "lora"]}]}
    assert static_twin(decisions) == {"0": {"a": "full", "b": "lora", "c": "lora"}, "3": {"b": "frozen"}}
    # the output adapter is no policy's to decide: not in the plan, and the twin gets one of its own
    with_head = {**decisions, "layers": ["a", "b", "lm_head"], "output_adapter": "lm_head"}
    assert static_twin(with_head) == {"0": {"a": "full", "b": "lora"}, "3": {"b": "frozen"}}


def test_a_twin_trains_what_its_method_trains_but_spends_no_budget():
    method = {"method": "hybrid", "label": "h", "lr": 1e-4, "lora": {"r": 8}, "train_embeddings": "output",
              "memory_budget": "lora+25%", "hybrid": {"calibration_steps": 4}}
    plan = {"0": {"a": "full"}}
    assert twin_method(method, plan) == {"lr": 1e-4, "lora": {"r": 8}, "train_embeddings": "output",
                                         "method": "scheduled", "scheduled": {"plan": plan}, "label": "h twin"}
    assert twin_method({**method, "train_embeddings": None}, plan, output_adapter=True)["train_embeddings"] == \
        "output_lora"


def test_the_default_is_chosen_without_reading_the_test_split(tiny, tmp_path):  # noqa: F811
    """Poison the test side's labels: the validation rows (every figure) and the choice stay the same."""
    suite_path = write_suite(tmp_path / "suite.yaml", tiny)
    suite = load_suite(suite_path)
    before = run_suite(suite, "validation", fresh_process=False)
    chosen = choose_default(before, suite["candidates"], suite["clear_lead"])
    data_cfg = suite["tasks"][0]["data"]
    test_side = set(load_data(data_cfg, "test").eval_texts)
    with open(tiny["data"], newline="") as f:
        rows = list(csv.DictReader(f))
    poisoned = tmp_path / "poisoned.csv"
    with poisoned.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "sentiment": ("neg" if r["sentiment"] == "pos" else "pos")
                             if r["review"] in test_side else r["sentiment"]})
    suite2 = load_suite(write_suite(tmp_path / "suite2.yaml", tiny, data_path=poisoned))
    assert load_data(suite2["tasks"][0]["data"], "test").eval_labels != load_data(data_cfg, "test").eval_labels
    after = run_suite(suite2, "validation", fresh_process=False)
    key = ("method", "seed", "accuracy", "eval_set", "data_order", "steps", "trainable_end")
    assert [tuple(r[k] for k in key) for r in after] == [tuple(r[k] for k in key) for r in before]
    # times and memory are measured, not read from data: they vary between the two runs on this busy
    # machine; with the first run's costs, the choice from the poisoned run's figures is the same
    costs = ("wall_time_s", "peak_rss_mb")
    after = [{**a, **{k: b[k] for k in costs}} for a, b in zip(after, before)]
    assert choose_default(after, suite2["candidates"], suite2["clear_lead"]) == chosen


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_splits_never_mix(name):
    """Validation is carved from the test split's training side; the test side shares no text with
    either, except texts the source itself repeats (in different groups)."""
    try:
        test = load_data({"name": name}, "test")
        val = load_data({"name": name}, "validation")
    except ConfigError as err:
        pytest.skip(str(err))
    repeated = {t for t, n in Counter(test.train_texts + test.eval_texts).items() if n > 1}
    assert set(val.train_texts) | set(val.eval_texts) <= set(test.train_texts)
    assert (set(val.train_texts) | set(val.eval_texts)) & set(test.eval_texts) <= repeated
    assert set(val.train_texts) & set(val.eval_texts) <= repeated
    assert len(test.eval_texts) and len(val.eval_texts)


def made_up_rows():
    """Two tasks, three seeds: Full leads by 10 points on 'a', 1 on 'b'; 'm' takes 80% of it on 'a'."""
    base = {"a": {"lora": 0.70, "full": 0.80, "m": 0.78, "topk": 0.79},
            "b": {"lora": 0.90, "full": 0.91, "m": 0.90, "topk": 0.86}}
    rows = []
    for task, means in base.items():
        for method, mean in means.items():
            for seed, noise in enumerate((-0.002, 0.0, 0.002)):
                rows.append({"task": task, "method": method, "seed": seed, "accuracy": mean + noise,
                             "wall_time_s": {"lora": 10, "full": 14, "m": 9, "topk": 7}[method],
                             "peak_rss_mb": 100})
                if not (task == "b" and method == "m"):
                    rows[-1]["flops_per_step"] = {"lora": 2, "full": 3, "m": 2.1, "topk": 1}[method]
    return rows


def test_the_table_and_the_goals_follow_their_definitions(tmp_path):
    rows = made_up_rows()
    summary = task_summary([r for r in rows if r["task"] == "a"])
    assert math.isclose(summary["m"]["share"], 0.8) and math.isclose(summary["m"]["time"], 0.9)
    assert math.isclose(summary["m"]["vs_lora"]["mean"], 0.08)
    table = suite_table(rows)
    assert math.isclose(summary["m"]["flops"], 1.05)
    # 'm' has no FLOPs on 'b' (rows written before they were priced): "–", not a mean of what is there
    assert "| m | 78.00 (+8.00 [+8.00, +8.00]) · 80% | 90.00 (+0.00 [+0.00, +0.00]) · 0% | 0.90 | – | 1.00 |" in table
    assert "| topk | 79.00 (+9.00 [+9.00, +9.00]) · 90% | 86.00 (-4.00 [-4.00, -4.00]) · -400% | 0.70 | 0.50 | 1.00 |" \
        in table
    g = goals(rows, "m", ["m"], {"accuracy": 0.02})
    assert g["tasks"]["a"]["full_leads"] and not g["tasks"]["b"]["full_leads"]
    assert math.isclose(g["mean_share_where_full_leads"], 0.8) and g["never_below_lora"]
    assert g["tasks"]["a"]["best_static"] == "topk" and g["tasks"]["a"]["below_best_static"]  # 0.78 < 0.79
    assert g["tasks"]["b"]["best_static"] in ("lora", "m") or not g["tasks"]["b"]["below_best_static"]
    assert choose_default(rows, ["m", "topk"], {"accuracy": 0.02})["chosen"] == "m"  # topk is below LoRA on b
    assert choose_default([r for r in rows if r["task"] == "a"], ["m", "topk"], {"accuracy": 0.02})["chosen"] == "topk"
    assert choose_default(rows, ["m", "topk"], {"accuracy": 0.02})["qualified"] == ["m"]  # topk: 4 points below on b
    shown = goals_table({"m": g, "unrun": goals(rows, "unrun", ["m"], {"accuracy": 0.02})})
    assert "| m | yes | 80% | no: a (vs topk) | 0.90 |" in shown  # the failing task is named
    assert "| unrun |" not in shown and "no rows on this split: unrun" in shown  # no 'yes' for what never ran
    wide = [{**r, "method": "wide", "accuracy": 0.80 + (0.05 if r["seed"] == 1 else -0.02)}
            for r in rows if r["method"] == "topk"]  # better than topk by mean, interval too wide to beat m
    with_wide = goals(rows + wide, "m", ["m"], {"accuracy": 0.02})["tasks"]["a"]
    assert with_wide["below_best_static"] and with_wide["best_static"] == "topk"  # topk's narrow lead still counts
    only_b = [r for r in rows if r["method"] != "topk" or r["task"] == "b"]
    partial = goals(only_b, "topk", ["m", "topk"], {"accuracy": 0.02})
    assert partial["missing"] == ["a"]
    shown = goals_table({"topk": partial})
    assert "| topk (no rows on a) | no: b | – (Full leads clearly on none of its tasks) |" in shown
    with pytest.raises(ConfigError, match="topk on a"):  # a share over fewer tasks is not comparable
        choose_default(only_b, ["m", "topk"], {"accuracy": 0.02})
    suite = {"name": "s", "output_dir": str(tmp_path / "out"), "candidates": ["m", "topk"], "default": "m",
             "clear_lead": {"accuracy": 0.02}}
    with pytest.raises(ConfigError, match="topk on a"):
        report_suite(only_b, suite, "validation", choose=True)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_suite_files_are_refused_by_name(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="unknown key"):
        load_suite(write_suite(tmp_path / "s.yaml", tiny, seed=[0]))
    with pytest.raises(ConfigError, match="list a 'full' method"):
        load_suite(write_suite(tmp_path / "s.yaml", tiny, methods=["lora"]))
    with pytest.raises(ConfigError, match="candidates: \\['nope'\\]"):
        load_suite(write_suite(tmp_path / "s.yaml", tiny, candidates=["nope"]))
    from adaptopt.cli.main import main
    good = str(write_suite(tmp_path / "s.yaml", tiny))
    assert main(["suite", good, "--choose"]) == 2  # choosing needs the validation split
    assert main(["suite", good, "--tasks", "nope"]) == 2
    assert main(["suite", good, "--report-only"]) == 2  # nothing run yet: the task is named


def test_a_suite_runs_its_benchmark_unless_told_which_methods(tiny, tmp_path):  # noqa: F811
    """Without ``--methods`` a suite runs the file's ``benchmark`` (every method if it names none);
    ``--methods all`` runs every method; labels that are not the file's are refused by name."""
    everything = load_suite(write_suite(tmp_path / "all.yaml", tiny))
    assert everything["benchmark"] is None and methods_to_run(everything, None) is None
    suite = load_suite(write_suite(tmp_path / "s.yaml", tiny, benchmark=["lora", "full", "automode twin"]))
    assert methods_to_run(suite, None) == ["lora", "full", "automode twin"]
    assert methods_to_run(suite, "all") is None
    assert methods_to_run(suite, "hybrid,automode twin") == ["hybrid", "automode twin"]
    with pytest.raises(ConfigError, match="--methods \\['nope'\\]"):
        methods_to_run(suite, "lora,nope")
    for bad in (["hybrid twin"], [], "lora", [{"method": "lora"}]):  # hybrid has no twin here; empty; not labels
        with pytest.raises(ConfigError, match="benchmark: expected a non-empty list"):
            load_suite(write_suite(tmp_path / "bad.yaml", tiny, benchmark=bad))


def test_the_shipped_suites_benchmark_holds_what_its_goals_read():
    """The shipped suite's benchmark runs LoRA, Full and the default: the goals' references and subject."""
    from adaptopt.cli.main import CONFIGS
    suite = load_suite(CONFIGS / "suites" / "suite.yaml")
    assert {"lora", "full", suite["default"]} <= set(methods_to_run(suite, None))


def test_the_suites_small_form_runs_end_to_end_on_real_tasks(tmp_path):
    """The shipped quick suite (a real MiniLM task, the references, the default and its twin, two
    seeds): every method in the table, the Pareto plot, the goals of the default."""
    from adaptopt.cli.main import CONFIGS
    from adaptopt.cli.suite import write_suite as write_results
    suite = load_suite(CONFIGS / "suites" / "suite_quick.yaml", str(tmp_path))
    try:
        for task in suite["tasks"]:
            load_data(task["data"], "validation")
    except ConfigError as err:
        pytest.skip(str(err))
    rows = run_suite(suite, "test", fresh_process=False)
    result = write_results(rows, suite, "test", choose=False)
    table = (tmp_path / "suite-test.md").read_text()
    assert "| method | rotten_tomatoes (accuracy) | time / LoRA | FLOPs / LoRA | memory / LoRA |" in table
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and " [" in line]
    flops = {cell[0][2:]: cell[-2] for cell in cells}
    assert flops["lora"] == "1.00" and float(flops["full"]) > float(flops["hybrid"]) == float(flops["hybrid twin"])
    assert (tmp_path / "pareto-rotten_tomatoes-test.png").stat().st_size > 0
    for method in ("full", "lora", "hybrid", "hybrid twin"):
        assert f"\n| {method} |" in table
    assert set(result["goals"]) == {"hybrid"} and set(result["goals"]["hybrid"]["tasks"]) == {"rotten_tomatoes"}
