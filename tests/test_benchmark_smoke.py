"""The cheap-score benchmark in small form (a tiny BERT, one repeat, one window): it runs and
prints every figure it reports on MiniLM (tests/benchmarks/cheap_scores.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCHMARK = Path(__file__).resolve().parent / "benchmarks" / "cheap_scores.py"


@pytest.mark.parametrize("score", ["cheap", "probed"])
def test_cheap_score_benchmark_runs_small(score):
    run = subprocess.run([sys.executable, str(BENCHMARK), "--model", "tiny", "--repeats", "1", "--steps", "1",
                          "--windows", "1", "--window", "2", "--between", "1", "--frozen-block", "--score", score],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for figure in ("cheap scored", "exact scored", "× unscored", "Spearman(cheap, exact)", "blocks: min"):
        assert figure in run.stdout
