"""A user's first day with the command line, each case a subprocess run of ``adaptopt`` checking the
exit code, the message and the output folder: messy labels, repeated headers, a byte-order mark,
empty texts."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")
from tests.test_cli import tiny, write_config  # noqa: E402,F401  (tiny is a fixture)

SHORT = {"epochs": 1, "max_steps": 3, "batch_size": 16, "lr": 3e-3, "lora_lr": 1e-2, "max_length": 16}


def adaptopt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "adaptopt.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def messy_csv(tmp_path, tiny, edit, encoding="utf-8", name="messy.csv") -> str:  # noqa: F811
    """The tiny reviews CSV with ``edit(rows)`` applied to its rows (header included)."""
    with open(tiny["data"], newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    path = tmp_path / name
    with path.open("w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows(rows)
    return str(path)


def run_train(tmp_path, tiny, data_path, **data_keys):  # noqa: F811
    config = write_config(tmp_path / "run.yaml", tiny, training=SHORT,
                          data={"path": data_path, "text_column": "review", "label_column": "sentiment",
                                "group_column": "film", **data_keys})
    return adaptopt("train", config, "--no-progress"), tmp_path / "out"


def _case_variants(rows):
    """Labels 'pos', 'pos ' and 'Pos' (and 'neg'): three spellings of one class."""
    for i, row in enumerate(rows[1:], 1):
        if row[1] == "pos" and i % 3 == 1:
            row[1] = "pos "
        elif row[1] == "pos" and i % 3 == 2:
            row[1] = "Pos"
    return rows


def test_labels_differing_by_case_stop_the_run_naming_values_and_rows(tmp_path, tiny):  # noqa: F811
    run, out = run_train(tmp_path, tiny, messy_csv(tmp_path, tiny, _case_variants))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "'Pos' (rows " in run.stderr and "vs 'pos' (rows " in run.stderr  # 'pos ' was stripped into 'pos'
    assert "data.label_map" in run.stderr and "data.normalize_labels: lower" in run.stderr
    assert "Traceback" not in run.stderr and sorted(p.name for p in out.iterdir()) == ["error.log"]


@pytest.mark.parametrize("fix", [{"normalize_labels": "lower"}, {"label_map": {"Pos": "pos"}}])
def test_labels_mapped_or_normalised_train_as_one_class(tmp_path, tiny, fix):  # noqa: F811
    run, out = run_train(tmp_path, tiny, messy_csv(tmp_path, tiny, _case_variants), **fix)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "labels.json").read_text()) == {"0": "neg", "1": "pos"}


def _repeated_header(rows):
    return rows[:60] + [rows[0]] + rows[60:]  # two files concatenated, each with its header line


def test_a_repeated_header_stops_the_run_unless_asked_to_drop_it(tmp_path, tiny):  # noqa: F811
    data = messy_csv(tmp_path, tiny, _repeated_header)
    run, out = run_train(tmp_path, tiny, data)
    assert run.returncode == 2
    assert "1 row(s) repeat the header ('review', 'sentiment'): row 60 (line 61 of the CSV)" in run.stderr
    assert "data.skip_repeated_headers: true" in run.stderr and sorted(p.name for p in out.iterdir()) == ["error.log"]
    (out / "error.log").unlink()
    run, out = run_train(tmp_path, tiny, data, skip_repeated_headers=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dropped 1 row(s) repeating the header" in run.stderr
    assert json.loads((out / "labels.json").read_text()) == {"0": "neg", "1": "pos"}  # no class named 'sentiment'


def test_a_byte_order_mark_is_encoding_and_empty_texts_are_counted(tmp_path, tiny):  # noqa: F811
    def blank_two(rows):
        rows[5][0] = rows[9][0] = "  "
        return rows
    run, out = run_train(tmp_path, tiny, messy_csv(tmp_path, tiny, blank_two, encoding="utf-8-sig"))
    assert run.returncode == 0, run.stderr[-3000:]  # the first column is 'review', not '\ufeffreview'
    result = json.loads((out / "result.json").read_text())
    assert result["data_notes"] == ["dropped 2 row(s) with an empty 'review' (row 5 (line 6 of the CSV), "
                                    "row 9 (line 10 of the CSV))"]
    assert "dropped 2 row(s) with an empty 'review'" in run.stderr
    assert result["train_examples"] + result["eval_examples"] == 238


# ----------------------------------------------------------------- checked before the first step
def test_a_max_length_beyond_the_models_positions_stops_before_training(tmp_path, tiny):  # noqa: F811
    config = write_config(tmp_path / "run.yaml", tiny, training={**SHORT, "max_length": 100000})
    run = adaptopt("train", config, "--no-progress")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "training.max_length: 100000, but this model reads at most 64 positions" in run.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["error.log"]


def _three_classes(rows):
    for i, row in enumerate(rows[1:], 1):
        if i % 3 == 0:
            row[1] = "meh"
    return rows


def test_a_model_whose_head_has_another_size_is_refused_or_replaced_on_request(tmp_path, tiny):  # noqa: F811
    import transformers
    headed = tmp_path / "two_class_model"
    config = transformers.BertConfig.from_pretrained(tiny["model"])
    config.num_labels, config.id2label, config.label2id = 2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    transformers.BertForSequenceClassification(config).save_pretrained(headed)
    transformers.AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(headed)
    data = messy_csv(tmp_path, tiny, _three_classes)
    keys = {"data": {"path": data, "text_column": "review", "label_column": "sentiment", "group_column": "film"},
            "training": SHORT}
    run = adaptopt("train", write_config(tmp_path / "a.yaml", tiny, model={"path": str(headed)}, **keys))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "already has a classification head for 2 classes ['neg', 'pos'], and the data has 3" in run.stderr
    assert "model.new_head: true" in run.stderr
    (tmp_path / "out" / "error.log").unlink()
    run = adaptopt("train", write_config(tmp_path / "b.yaml", tiny, model={"path": str(headed), "new_head": True},
                                         **keys), "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "starting a new 3-class head in place of the checkpoint's 2-class head" in run.stderr
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"0": "meh", "1": "neg", "2": "pos"}


def test_a_run_shorter_than_the_policys_schedule_warns_and_reports_what_trained(tmp_path, tiny):  # noqa: F811
    short = write_config(tmp_path / "short.yaml", tiny, training=SHORT,
                         fine_tuning={"method": "hybrid", "lora": {"r": 4}, "hybrid": {"calibration_steps": 20}})
    run = adaptopt("train", short, "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "policy 'hybrid' makes its first decision at step 20, but this run has 3 optimizer steps" in run.stderr
    # the decision falls on the last step: it moves layers that never train, and the report says what trained
    last = write_config(tmp_path / "last.yaml", tiny, training=SHORT,
                        fine_tuning={"method": "hybrid", "lora": {"r": 4}, "hybrid": {"calibration_steps": 3}})
    run = adaptopt("train", last, "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "makes its first decision at step 3, but this run has 3 optimizer steps" in run.stderr
    assert "the decision at step 3, the run's last, moved" in run.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    layers = sum(result["modes_end"].values())
    assert result["modes_end"] == {"full": 0, "lora": layers, "frozen": 0} and result["untrained_transitions"] > 0
    assert result["trainable_end"] == result["trainable_start"]  # all-LoRA trained, end to end


def test_one_default_for_the_optimizer_and_the_command_line():
    from adaptopt import DEFAULT_POLICY, AdaptiveOptimizer, Hybrid
    from adaptopt.cli.config import normalise
    from tests.tiny_models import tiny_llama
    assert DEFAULT_POLICY == "hybrid"
    assert isinstance(AdaptiveOptimizer(tiny_llama(), total_steps=100).policy, Hybrid)
    config = normalise({"model": "minilm", "data": "rotten_tomatoes"}, "no_fine_tuning.yaml")
    assert config["fine_tuning"]["method"] == DEFAULT_POLICY
