"""The adaptopt command on bad input a hostile user gave it: exit 2, one message naming the
file and the key, and nothing in the output directory but error.log — before any training."""
from __future__ import annotations

import csv

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")
from adaptopt.cli.main import main  # noqa: E402
from tests.test_cli import tiny, write_config  # noqa: E402,F401  (tiny is a fixture)


def _csv(path, rows, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerows(rows)
    return str(path)


def _data(tmp_path, case):
    header = ["review", "sentiment", "film"]
    good = [["good movie", "pos", "m1"], ["awful plot", "neg", "m2"]] * 10
    if case == "row_without_label":
        return {"path": _csv(tmp_path / "d.csv", [header] + good + [["good plot"]]), "text_column": "review",
                "label_column": "sentiment"}
    if case == "empty_label":
        return {"path": _csv(tmp_path / "d.csv", [header] + good + [["good plot", "", "m3"]]),
                "text_column": "review", "label_column": "sentiment"}
    if case == "all_texts_empty":
        return {"path": _csv(tmp_path / "d.csv", [header] + [["", "pos", "m1"], ["", "neg", "m2"]] * 5),
                "text_column": "review", "label_column": "sentiment"}
    if case == "latin1_csv":
        return {"path": _csv(tmp_path / "d.csv", [header] + good + [["très bon", "pos", "m3"]], "latin-1"),
                "text_column": "review", "label_column": "sentiment"}
    return None


CASES = {
    "row_without_label": ("data", "row 21 (line 22 of the CSV) has no 'sentiment' value"),
    "empty_label": ("data", "row 21 (line 22 of the CSV) has no 'sentiment' value"),
    "all_texts_empty": ("data", "every 'review' value"),
    "latin1_csv": ("data", "is not UTF-8 text"),
    "epochs_negative": ({"training": {"epochs": -1}}, "training.epochs: expected a number > 0"),
    "batch_size_zero": ({"training": {"batch_size": 0}}, "training.batch_size: expected an integer ≥ 1"),
    "max_length_word": ({"training": {"max_length": "long"}}, "training.max_length: expected an integer"),
    "eval_fraction_one": ("eval_fraction", 1.0),
    "eval_fraction_word": ("eval_fraction", "half"),
    "lr_word": ({"training": {"lr": "fast"}}, "training.lr: expected a number > 0"),
    "method_lr_negative": ({"fine_tuning": {"method": "lora", "lr": -1}}, "fine_tuning.lr: expected a number"),
    "output_dir_is_a_file": ("output_file", "output_dir"),
    "model_without_weights": ("model", "cannot be loaded as a classification model"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_cli_input_stops_with_one_message(tiny, tmp_path, capsys, case):  # noqa: F811
    out = tmp_path / "out"
    path = tmp_path / "bad.yaml"
    kind, expected = CASES[case]
    overrides: dict = {}
    if kind == "data":
        overrides["data"] = _data(tmp_path, case)
    elif kind == "eval_fraction":
        overrides["data"] = {"path": str(tiny["data"]), "text_column": "review", "label_column": "sentiment",
                             "eval_fraction": expected}
        expected = "data.eval_fraction: expected a number in (0, 1)"
    elif kind == "output_file":
        out.write_text("not a folder")
        expected = f"output_dir: {out} exists and is a file"
    elif kind == "model":
        bare = tmp_path / "bare_model"
        bare.mkdir()
        (bare / "config.json").write_text((tiny["model"] / "config.json").read_text())
        overrides["model"] = {"path": str(bare)}
        expected = f"model.path: {bare} cannot be loaded as a classification model"
    else:
        overrides = dict(kind)
        if "training" in overrides:
            overrides["training"] = {"epochs": 1, "batch_size": 16, "lr": 3e-3, "max_length": 16,
                                     **overrides["training"]}
    write_config(path, tiny, **overrides)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("adaptopt: error:") == 1 and "Traceback" not in err
    assert expected in err, err
    if kind == "output_file":
        assert out.read_text() == "not a folder"
    else:
        assert sorted(p.name for p in out.iterdir()) == ["error.log"]
