"""The comparison that can see one point: paired seeds, paired-t intervals, the LoRA–Full line,
learning rates chosen on validation data only, and bad input refused before training."""
from __future__ import annotations

import csv
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")
from adaptopt.cli.config import ConfigError, load_yaml, normalise  # noqa: E402
from adaptopt.cli.main import main  # noqa: E402
from adaptopt.cli.paired import interval, line_gap, paired_differences, pays, t_quantile  # noqa: E402
from tests.test_cli import tiny, write_config  # noqa: E402,F401  (tiny is a fixture)


def rows(table: dict[str, list[float]], times: dict[str, float], metric: str = "accuracy") -> list[dict]:
    return [{"method": m, "seed": s, metric: v, "wall_time_s": times[m], "peak_rss_mb": times[m]}
            for m, values in table.items() for s, v in enumerate(values)]


def test_the_interval_matches_a_hand_computation():
    result = interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)  # sample standard deviation 1.2910
    half = 3.182 * sd / 2  # t(0.975, df=3) = 3.182, √4 = 2
    assert result["mean"] == 2.5 and result["lo"] == pytest.approx(2.5 - half) and result["hi"] == pytest.approx(
        2.5 + half)
    assert t_quantile(1) == 12.706 and t_quantile(2) == 4.303 and t_quantile(500) == 1.96
    assert math.isnan(interval([0.7])["lo"])


def test_paired_differences_and_the_line_by_hand():
    data = rows({"lora": [0.70, 0.72, 0.71], "full": [0.74, 0.76, 0.75], "auto": [0.73, 0.75, 0.735]},
                {"lora": 100.0, "full": 200.0, "auto": 100.0})
    diffs = paired_differences(data, "accuracy", "lora")
    assert diffs["auto"]["mean"] == pytest.approx((0.03 + 0.03 + 0.025) / 3)
    assert diffs["lora"]["mean"] == 0 and diffs["lora"]["lo"] == 0
    gap = line_gap(data, "accuracy", "wall_time_s", "lora", "full")["auto"]
    # at LoRA's cost the line is LoRA itself: the gap is the paired difference to LoRA
    assert gap["mean"] == pytest.approx(diffs["auto"]["mean"]) and gap["cost_fraction"] == 0
    assert pays(gap, "accuracy") and not pays({**gap, "lo": -0.01}, "accuracy")
    assert pays({"mean": -1.0, "lo": -2.0, "hi": -0.5}, "perplexity")


def test_same_seed_same_data_order_eval_set_and_initial_head(tiny, tmp_path):  # noqa: F811
    from adaptopt.cli.runner import compare_runs
    path = write_config(tmp_path / "c.yaml", tiny, training={"epochs": 1, "max_steps": 4, "batch_size": 8,
                                                               "lr": 1e-3, "max_length": 16},
                        compare={"methods": ["full", "lora", {"method": "automode", "automode": {"u": 1}},
                                             "hybrid"],  # the default: its scoring pass reads the first batch
                                 "seeds": [0, 1]})
    config = normalise(load_yaml(path), path)
    result = compare_runs(config, tmp_path / "out", fresh_process=False)
    for seed in (0, 1):
        runs = [r for r in result if r["seed"] == seed]
        for key in ("data_order", "eval_set", "initial_head"):
            assert len({r[key] for r in runs}) == 1, (seed, key)
    assert len({r["data_order"] for r in result}) == 2  # another seed, another order
    assert len({r["initial_head"] for r in result}) == 2
    from adaptopt.cli.paired import paired_table
    from adaptopt.cli.report import plot_pareto
    table = paired_table(result, "accuracy", {"full": "weights 0.001"})
    assert table.count("\n") == 5 and "Δ vs lora" in table and "above LoRA–Full line, time" in table  # 4 methods
    assert "weights 0.001" in table
    assert plot_pareto(result, tmp_path / "pareto.png").stat().st_size > 10_000


def _poison_test_labels(tiny, tmp_path) -> str:  # noqa: F811
    """A copy of the CSV whose held-out (test) rows have their labels flipped."""
    from adaptopt.cli.data import _split
    with open(tiny["data"], newline="") as f:
        data = list(csv.DictReader(f))
    groups = [r["film"] for r in data]
    _, held = _split(groups, groups, 0.2, 0)
    for i in held:
        data[i]["sentiment"] = "neg" if data[i]["sentiment"] == "pos" else "pos"
    path = tmp_path / "poisoned.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    return str(path)


def test_learning_rate_selection_never_reads_the_test_split(tiny, tmp_path):  # noqa: F811
    from adaptopt.cli.tune import run_tune
    training = {"epochs": 1, "max_steps": 4, "batch_size": 8, "max_length": 16}
    tune = {"lr": [1e-4, 3e-3], "lora_lr": [1e-3, 3e-2], "seeds": [0]}
    results = []
    for data_path in (str(tiny["data"]), _poison_test_labels(tiny, tmp_path)):
        path = write_config(tmp_path / "t.yaml", tiny, training=training, tune=tune,
                            data={"path": data_path, "text_column": "review", "label_column": "sentiment",
                                  "group_column": "film"})
        results.append(run_tune(normalise(load_yaml(path), path), fresh_process=False))
    assert results[0]["chosen"] == results[1]["chosen"]
    assert results[0]["validation"] == results[1]["validation"]
    assert set(results[0]["chosen"]) == {"lr", "lora_lr"}


@pytest.mark.parametrize("overrides, message", [
    ({"tune": {"lr": [1e-4, 0.0]}}, "tune.lr: expected a non-empty list of learning rates > 0"),
    ({"tune": {"lora_lr": []}}, "tune.lora_lr: expected a non-empty list"),
    ({"data": {"name": "rotten_tomatoes", "validation_fraction": 1.5}}, "data.validation_fraction: expected a number"),
    ({"compare": {"methods": ["lora"], "seeds": [0, 0]}}, "compare.seeds: seeds must be distinct"),
    ({"tune": {"seeds": []}}, "tune.seeds: expected a non-empty list"),
])
def test_bad_comparison_settings_are_refused_by_key(tiny, tmp_path, overrides, message):  # noqa: F811
    path = write_config(tmp_path / "bad.yaml", tiny, **overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        normalise(load_yaml(path), path)


def test_a_schedule_that_would_freeze_every_unit_stops_before_training(tiny, tmp_path, capsys):  # noqa: F811
    path = write_config(tmp_path / "bad.yaml", tiny, fine_tuning={
        "method": "automode", "automode": {"freeze_from": 1, "freeze_max": 100}})
    assert main(["train", path]) == 2
    assert "freeze_max must be < 100" in capsys.readouterr().err
