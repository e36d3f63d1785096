"""kill -9 during saves (issue: nothing torn). A worker saves two different models in a loop
into one folder; it is killed at random moments; after every kill the folder must load as one
of the two saves, or — before the first save finished — fail with a clear error. Temporaries
of killed saves must not pile up, and two processes saving into one folder must not tear it."""
from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adaptopt import find_adapters, load_adapters, save_adapters
from tests import crash_worker

WORKER = Path(__file__).resolve().parent / "crash_worker.py"


def start(kind: str, folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(WORKER), kind, str(folder)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def wait_for_save(process: subprocess.Popen) -> float:
    """Block until the worker reports a finished save; returns how long that save took."""
    line = process.stdout.readline().split()
    assert line and line[0] == "saved", f"the worker stopped without saving: {line}"
    return float(line[1])


def kill_at_random(kind: str, folder: Path, kills: int, seed: int) -> None:
    """Kill a saving worker ``kills`` times, each at a random moment inside a save: after 1–2
    finished saves (counted, not timed), a random fraction of the last save's own duration later.
    The moments scale with the machine's speed, so a loaded machine tests the same thing."""
    rng = random.Random(seed)
    for _ in range(kills):
        process = start(kind, folder)
        for _ in range(rng.randint(1, 2)):
            duration = wait_for_save(process)
        time.sleep(rng.uniform(0.0, 1.2) * duration)
        process.kill()
        process.wait()
        yield


def which_save(actual: torch.Tensor, expected: dict) -> str | None:
    for name, value in expected.items():
        if torch.allclose(actual, value, rtol=1e-5, atol=1e-5):
            return name
    return None


def load_adapters_result(folder: Path, expected: dict) -> str:
    model = crash_worker.plain_base()
    try:
        load_adapters(model, folder / "target")
    except ValueError as err:
        assert "holds no adaptopt adapters" in str(err), err  # only before any save completed
        return "none"
    name = which_save(crash_worker.outputs(model, "adapters"), expected)
    assert name is not None, "the folder loaded as a mix of two saves"
    return name


def test_save_adapters_survives_kill_9_at_any_moment(tmp_path):
    seen = []
    for _ in kill_at_random("adapters", tmp_path, kills=12, seed=0):
        expected = torch.load(tmp_path / "expected.pt", weights_only=True)
        seen.append(load_adapters_result(tmp_path, expected))
    assert set(seen) <= {"A", "B"}, seen  # a save finished before every kill: the folder holds a whole one
    target = tmp_path / "target"
    save_adapters(crash_worker.adapted("adapters", 1, merged=True), target)  # the next save cleans up
    assert not [p.name for p in target.iterdir() if p.name.endswith(".tmp")]
    assert len(list(target.glob("adapters*.safetensors"))) == 1


def exports_seen(kind: str, folder: Path, kills: int, seed: int, load) -> list[str]:
    """Kill an exporting worker ``kills`` times; after each, which save ``folder/target`` holds."""
    seen = []
    for _ in kill_at_random(kind, folder, kills=kills, seed=seed):
        expected = torch.load(folder / "expected.pt", weights_only=True)
        assert (folder / "target").exists(), "an export had finished before the kill"
        name = which_save(crash_worker.outputs(load(folder / "target"), kind), expected)
        assert name is not None, "the export loaded as neither save"
        seen.append(name)
    return seen


def test_export_merged_survives_kill_9_at_any_moment(tmp_path):
    from safetensors.torch import load_file

    from adaptopt import export_merged

    def load(target):
        model = crash_worker.plain_base()
        model.load_state_dict(load_file(str(target / "model.safetensors")))
        return model
    seen = exports_seen("merged", tmp_path, kills=12, seed=1, load=load)
    assert set(seen) <= {"A", "B"} and len(seen) == 12, seen
    export_merged(crash_worker.adapted("merged", 1, merged=False), tmp_path / "target")  # cleans up after kills
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".target.")]


def test_export_merged_of_a_transformers_model_survives_kill_9(tmp_path):
    transformers = pytest.importorskip("transformers")
    seen = exports_seen("merged-hf", tmp_path, kills=4, seed=2, load=lambda target: (
        transformers.AutoModelForSequenceClassification.from_pretrained(str(target)).eval()))
    assert set(seen) <= {"A", "B"} and len(seen) == 4, seen  # each kill left one whole export


def test_two_processes_saving_into_one_folder_leave_one_whole_save(tmp_path):
    """Every DDP rank saving to the same path: unique temporaries, commits in turn."""
    first, second = start("adapters", tmp_path), start("adapters", tmp_path)
    durations = [wait_for_save(process) for process in (first, second)]  # both have committed a save
    time.sleep(0.5 * max(durations))  # then die inside their next ones
    for process in (first, second):
        process.kill()
        process.wait()
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert load_adapters_result(tmp_path, expected) in ("A", "B")


def test_a_save_after_a_kill_keeps_the_folder_loadable_and_the_model_unchanged(tmp_path):
    model = crash_worker.adapted("adapters", 2, merged=False)
    save_adapters(model, tmp_path)
    save_adapters(model, tmp_path)
    fresh = crash_worker.plain_base()
    load_adapters(fresh, tmp_path)
    assert find_adapters(fresh)
    torch.testing.assert_close(crash_worker.outputs(fresh, "adapters"), crash_worker.outputs(model, "adapters"))
