"""The adaptopt command end to end on a tiny config-built model and a CSV written here."""
from __future__ import annotations

import csv
import json
import random
import sys

import pytest

from adaptopt.formats.checkpoint import adapters_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("yaml")
from adaptopt.cli.main import main  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "actor", "scene", "the", "a", "was", "and"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT with a word-level vocabulary, and a CSV whose label is 'positive word present'."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model_dir = root / "model"
    transformers.BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = []
    for i in range(240):
        positive = i % 2 == 0
        words = rng.choices(WORDS[6:], k=6) + [rng.choice(WORDS[:3] if positive else WORDS[3:6])]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": "pos" if positive else "neg", "film": f"m{i % 30}"})
    data = root / "reviews.csv"
    with data.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["review", "sentiment", "film"])
        writer.writeheader()
        writer.writerows(rows)
    return {"model": model_dir, "data": data, "root": root}


def write_config(path, tiny, **overrides) -> str:
    import yaml
    config = {"model": {"path": str(tiny["model"])},
              "data": {"path": str(tiny["data"]), "text_column": "review", "label_column": "sentiment",
                       "group_column": "film"},
              "training": {"epochs": 8, "batch_size": 16, "lr": 3e-3, "lora_lr": 1e-2, "max_length": 16,
                           "logging_steps": 5},
              "fine_tuning": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
              "output_dir": str(path.parent / "out")}
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_train_evaluates_saves_and_plots(tiny, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny, fine_tuning={"method": "automode", "lora": {"r": 4},
                                                                    "automode": {"u": 4, "t": 50, "score_steps": 1}})
    assert main(["train", config, "--no-progress"]) == 0
    out = tmp_path / "out"
    result = json.loads((out / "result.json").read_text())
    assert result["accuracy"] > result["majority"] and 0 <= result["f1"] <= 1
    assert result["host_malloc"] == ("kept" if sys.platform.startswith("linux") else "not glibc")
    decisions = json.loads((out / "decisions.json").read_text())
    assert decisions["history"] and \
        {"step", "layer", "scores", "mode", "rank", "lr_scale"} <= set(decisions["history"][0])
    timeline = decisions["timeline"]  # what trained in each step, recorded as the step began
    assert [s["step"] for s in timeline] == list(range(1, result["steps"] + 1))
    assert result["trainable_end"] == timeline[-1]["trainable"] and sum(result["modes_end"].values()) == len(
        decisions["layers"])
    assert adapters_file(out / "adapters").is_file()
    for name in ("heatmap.png", "modes.png", "ranks.png", "merged/config.json"):
        assert (out / name).is_file(), name
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert merged.config.num_labels == 2
    labels = json.loads((out / "labels.json").read_text())
    assert sorted(labels.values()) == ["neg", "pos"]
    assert merged.config.id2label == {int(i): n for i, n in labels.items()}
    # the folder alone serves: tokenizer saved beside the weights, predictions under the real label names
    classify = transformers.pipeline("text-classification", model=str(out / "merged"))
    assert classify("good movie the plot")[0]["label"] in ("neg", "pos")
    assert not (out / "trainer").exists()


def test_compare_two_methods_two_seeds_writes_the_table(tiny, tmp_path):
    config = write_config(tmp_path / "cmp.yaml", tiny, compare={"methods": ["full", {"method": "lora",
                                                                                     "label": "lora r=4"}],
                                                                "seeds": [0, 1]})
    assert main(["compare", config]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["method"] for s in summary["summary"]] == ["full", "lora r=4"]
    assert len(summary["runs"]) == 4 and all(r["peak_rss_mb"] > 0 for r in summary["runs"])
    full, lora = summary["summary"]
    assert full["accuracy_vs_full"] == 1.0 and lora["accuracy_vs_lora"] == 1.0
    assert lora["trainable_mean"] < full["trainable_mean"]
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    table = (out / "summary.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3 and "accuracy vs Full" in table
    assert (out / "compare.png").is_file()
    assert all((out / "runs" / f"{m}-seed{s}" / "modes.png").is_file() for m in ("full", "lora-r-4") for s in (0, 1))


def test_scan_reports_every_layer_and_the_selection(tiny, tmp_path, capsys):
    assert main(["scan", str(tiny["model"]), "--top-percent", "50", "--output-dir", str(tmp_path)]) == 0
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert len(scan["layers"]) == 12  # 2 blocks × (query, key, value, 3 dense)
    by_type: dict = {}
    for layer in scan["layers"]:
        by_type.setdefault(layer["type"], []).append(layer["selected"])
    assert all(sum(flags) == 1 for flags in by_type.values())  # top 50% of 2 per type
    assert "layers selected" in capsys.readouterr().out
    assert (tmp_path / "scan.png").stat().st_size > 0


def test_scan_names_layers_as_the_saved_model_does(tmp_path, capsys):
    from tests.test_hf_checkpoints import word_tokenizer
    from tests.tiny_models import tiny_llama
    tiny_llama().save_pretrained(tmp_path / "llama")
    word_tokenizer().save_pretrained(tmp_path / "llama")
    assert main(["scan", str(tmp_path / "llama"), "--output-dir", str(tmp_path / "out")]) == 0
    layers = json.loads((tmp_path / "out" / "scan.json").read_text())["layers"]
    assert layers and all(r["layer"].startswith("model.layers.") for r in layers)  # as in LlamaForCausalLM
    assert {r["block"] for r in layers} == {0, 1} and (tmp_path / "out" / "scan.png").is_file()
    assert "Loading weights" not in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("yaml", "not valid YAML"),
    ("method", "unknown method 'lorra'"),
    ("key", "unknown key(s) ['epochz']"),
    ("data_path", "does not exist"),
    ("label", "column 'stars' is not in"),
    ("targets", "no target layers matched"),
])
def test_bad_input_stops_before_training_with_one_message(tiny, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    path = tmp_path / "bad.yaml"
    if case == "yaml":
        path.write_text(f"output_dir: {out}\nmodel: [unclosed\n")
    else:
        overrides = {
            "method": {"fine_tuning": {"method": "lorra"}},
            "key": {"training": {"epochz": 3}},
            "data_path": {"data": {"path": str(tmp_path / "missing.csv")}},
            "label": {"data": {"path": str(tiny["data"]), "text_column": "review", "label_column": "stars"}},
            "targets": {"fine_tuning": {"method": "lora", "lora": {"target_modules": ["q_proj"]}}},
        }[case]
        write_config(path, tiny, **overrides)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err or case in ("data_path", "label") and message in err
    assert err.count("adaptopt: error:") == 1
    if case != "yaml":  # a config that cannot be parsed names no output_dir to write into
        assert sorted(p.name for p in out.iterdir()) == ["error.log"]


def test_train_a_causal_lm_reports_loss_and_perplexity(tiny, tmp_path):
    """A tiny Llama on text only (no label column): perplexity falls well below the vocabulary size."""
    import yaml
    model_dir = tmp_path / "llama"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": "the movie was good and the plot was great"})
                               for _ in range(64)) + "\n")
    run = {"model": {"path": str(model_dir)}, "data": {"path": str(texts), "task": "causal_lm"},
           "training": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "max_length": 16},
           "fine_tuning": {"method": "full"}, "output_dir": str(tmp_path / "lm")}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", str(tmp_path / "lm.yaml"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "lm" / "result.json").read_text())
    assert set(result) >= {"loss", "perplexity"} and "accuracy" not in result
    assert result["perplexity"] < tokenizer.vocab_size / 3


def test_plan_builds_the_head_the_config_names():
    from adaptopt.cli.models import planned_task
    assert planned_task(transformers.BertConfig(architectures=["BertForSequenceClassification"])) == "classification"
    assert planned_task(transformers.BertConfig(architectures=["BertModel"])) == "classification"  # MiniLM's
    assert planned_task(transformers.LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal_lm"
    assert planned_task(transformers.GPT2Config(architectures=["GPT2LMHeadModel"])) == "causal_lm"
    assert planned_task(transformers.LlamaConfig()) == "causal_lm"  # a bare decoder: its language model


def test_plan_prints_peak_memory_per_policy_from_the_config(tiny, capsys):
    assert main(["plan", str(tiny["model"]), "--policies", "full,lora,hybrid", "--batch-size", "2",
                 "--seq-len", "8", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "policy" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["full", "lora", "hybrid"]
    totals = {r.split("|")[1].strip(): float(r.split("**")[1]) for r in rows}
    assert totals["full"] >= totals["hybrid"] >= totals["lora"] > 0
    flops = {r.split("|")[1].strip(): float(r.split("|")[-2]) for r in rows}  # FLOPs per step over LoRA's
    assert flops["full"] > flops["hybrid"] > flops["lora"] == 1.0
    assert main(["plan", str(tiny["model"]), "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert main(["plan", str(tiny["model"]), "--dtype", "int8"]) == 2  # refused by name
    assert main(["plan", str(tiny["model"]), "--autocast", "int8"]) == 2
    assert main(["plan", str(tiny["model"]), "--seq-len", "100"]) == 2  # beyond its 64 positions
    assert "reads at most 64 positions" in capsys.readouterr().err
    assert main(["plan", str(tiny["model"]), "--seq-len", "8", "--budget", "0.5x"]) == 2  # below LoRA
    assert "below what LoRA needs" in capsys.readouterr().err
    assert main(["plan", str(tiny["model"]), "--policies", "lora,hybrid", "--batch-size", "2", "--seq-len", "8",
                 "--rank", "2", "--budget", "lora+10%", "--autocast", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "memory budget lora+10%, autocast to bfloat16" in out
    # a policy the budget refuses is named below the others' rows; alone, it is an error
    assert main(["plan", str(tiny["model"]), "--policies", "lora,lisa", "--batch-size", "2", "--seq-len", "8",
                 "--rank", "2", "--budget", "lora+1%"]) == 0
    out = capsys.readouterr().out
    assert [r.split("|")[1].strip() for r in out.splitlines() if r.startswith("| ") and "policy" not in r] == ["lora"]
    assert "lisa: refused by the budget" in out and "fits no block" in out
    assert main(["plan", str(tiny["model"]), "--policies", "lisa", "--batch-size", "2", "--seq-len", "8",
                 "--rank", "2", "--budget", "lora+1%"]) == 2
    assert "fits no block" in capsys.readouterr().err
