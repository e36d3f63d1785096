"""The examples users copy from must keep running."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_loop_example_promotes_without_changing_the_model_and_then_trains():
    result = load("raw_loop").main()
    assert result["logit_change"] < 1e-5
    assert result["moved"] > 0
    assert result["accuracy"] > result["majority"]
