"""Benchmarks in small form: the cheap-score benchmark (a tiny BERT, one repeat, one window) runs and
prints every figure it reports on MiniLM (tests/benchmarks/cheap_scores.py); the compute estimate's
benchmark runs MiniLM's policies for a few steps and writes its table, JSON and plot
(tests/benchmarks/compute_estimate.py); the AdamW kernel benchmark times MiniLM's two FULL blocks
(tests/benchmarks/adamw_kernel.py); the GPU check stops cleanly on a machine without CUDA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_compute_estimate_benchmark_runs_small(tmp_path):
    script = BENCHMARK.parent / "compute_estimate.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--steps", "5", "--repeats", "1", "--batch", "2",
                          "--seq", "16", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "compute_estimate.json").read_text())["results"]
    assert [r["policy"] for r in results] == ["lora", "full", "hybrid", "hybrid f0", "lisa", "badam"]
    by_policy = {r["policy"]: r for r in results}
    assert by_policy["lora"]["estimated"] == by_policy["lora"]["measured"] == 1.0
    assert by_policy["full"]["estimated"] > 1.3 and by_policy["badam"]["estimated"] < 1.0
    assert "| minilm | full |" in run.stdout and (tmp_path / "compute_estimate.png").stat().st_size > 0
    real = subprocess.run([sys.executable, str(script), "--quick", "--real", "--policies", "lora,hybrid",
                           "--steps", "3", "--repeats", "1", "--batch", "2", "--seq", "16",
                           "--out", str(tmp_path / "real")],
                          capture_output=True, text=True, timeout=300)  # pretrained MiniLM, rotten_tomatoes' texts
    assert real.returncode == 0, real.stderr[-2000:]
    assert [r["policy"] for r in json.loads((tmp_path / "real" / "compute_estimate.json").read_text())["results"]] \
        == ["lora", "hybrid"]
    cuda = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True,
                          timeout=120)
    if not torch.cuda.is_available():
        assert cuda.returncode == 2 and "no CUDA device" in cuda.stdout


def test_adamw_kernel_benchmark_runs_small():
    script = BENCHMARK.parent / "adamw_kernel.py"
    run = subprocess.run([sys.executable, str(script), "--models", "minilm", "--repeats", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = next(line for line in run.stdout.splitlines() if line.startswith("| minilm"))
    elements = float(row.split("|")[2].strip().rstrip("M"))
    assert 3.5 < elements < 3.6  # two of MiniLM's blocks: 2 × 1.77M
    cuda = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True,
                          timeout=120)
    if not torch.cuda.is_available():
        assert cuda.returncode == 2 and "no CUDA device" in cuda.stdout
