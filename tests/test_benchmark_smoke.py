"""Benchmarks in small form: the cheap-score benchmark (a tiny BERT, one repeat, one window) runs and
prints every figure it reports on MiniLM (tests/benchmarks/cheap_scores.py); the GPU check stops
cleanly on a machine without CUDA."""
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


def test_the_gpu_check_stops_cleanly_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: scripts/gpu_check.sh runs the real thing")
    run = subprocess.run([sys.executable, str(BENCHMARK.parent / "gpu_step_time.py")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stdout
    script = BENCHMARK.parents[2] / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # parses; its gpu tests skip here
