"""Test configuration: hypothesis profiles and the repository root on sys.path for `tests.helpers`."""
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# "default" is what CI runs: at least 200 examples per property (issue 2's bar).
settings.register_profile("default", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("quick", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# CI replays one fixed sequence of examples (a submission cannot fail on a draw nobody saw);
# local runs keep exploring new examples and store any failure in .hypothesis/ for replay.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA; without it they are skipped, saying so
    (``scripts/gpu_check.sh`` runs exactly them on a GPU machine)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
