"""Two gloo processes under torchrun: ranks agree on decisions and stay bit-identical through
transitions, and equal a single process on the full batch (docs/design.md §8)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from adaptopt import Mode  # noqa: E402
from tests import distributed_worker  # noqa: E402
from tests.helpers import torchrun  # noqa: E402

WORKER = Path(distributed_worker.__file__)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("ddp")
    run = torchrun(WORKER, out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def _load(out: Path, scenario: str) -> tuple[dict, dict]:
    return tuple(load_file(str(out / f"{scenario}.rank{r}.safetensors")) for r in (0, 1))


def _params(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith("param/")}


def test_ranks_stay_identical_and_match_one_process_through_a_transition(ranks):
    r0, r1 = _load(ranks, "scheduled")
    assert int(r0["rebuilds"]) == 1  # the step-3 transition rebuilt the DDP wrapper once
    assert torch.equal(r0["modes"], r1["modes"])
    assert _params(r0).keys() == _params(r1).keys()
    for name in _params(r0):
        assert torch.equal(r0[name], r1[name]), f"ranks differ at {name}"

    single = distributed_worker.train("scheduled")
    assert torch.equal(single["modes"], r0["modes"])
    assert "param/bert.encoder.layer.1.attention.self.query.lora_A" in r0  # a factor born mid-run
    for name in _params(single):
        diff = float((single[name] - r0[name]).abs().max())
        assert diff <= 1e-5, f"{name}: DDP vs single process differ by {diff:.2e}"
    mean_rank_loss = (r0["losses"] + r1["losses"]) / 2
    assert torch.allclose(mean_rank_loss, single["losses"], atol=1e-5)
    # the run trained: layer 0 (FULL after step 3) moved away from its initial weights
    initial = {n: p.detach() for n, p in distributed_worker.build_model().named_parameters()}
    moved = r0["param/bert.encoder.layer.0.attention.self.query.base.weight"]
    assert float((moved - initial["bert.encoder.layer.0.attention.self.query.weight"]).abs().max()) > 1e-3


def test_automode_ranks_agree_on_decisions_from_different_data(ranks):
    r0, r1 = _load(ranks, "automode")
    assert torch.equal(r0["modes"], r1["modes"])
    assert len(set((r0["modes"] // 100).tolist())) > 1  # AutoMode really mixed modes
    assert int(r0["rebuilds"]) >= 1
    for name in _params(r0):
        assert torch.equal(r0[name], r1[name]), f"ranks differ at {name}"
    assert not torch.equal(r0["losses"], r1["losses"])  # they did see different data


def test_a_ddp_built_once_lets_ranks_drift_after_a_transition(ranks):
    """The failure AdaptiveDDP exists for: factors started after wrapping are never synchronised."""
    r0, r1 = _load(ranks, "plain_ddp")
    drift = max(float((r0[n] - r1[n]).abs().max()) for n in _params(r0))
    assert drift > 1e-3


def _assert_matches_one_process(r0: dict, r1: dict, single: dict) -> None:
    assert torch.equal(r0["modes"], r1["modes"]) and torch.equal(r0["modes"], single["modes"])
    compared = [k for k in single if k.startswith(("param/", "merged/"))]
    assert set(compared) == {k for k in r0 if k.startswith(("param/", "merged/"))}
    for name in compared:
        assert torch.equal(r0[name], r1[name]), f"ranks differ at {name}"
        diff = float((single[name] - r0[name]).abs().max())
        assert diff <= 1e-5, f"{name}: FSDP2 vs single process differ by {diff:.2e}"
    assert torch.allclose((r0["losses"] + r1["losses"]) / 2, single["losses"], atol=1e-5)


@pytest.mark.parametrize("scenario", ["fsdp2_toggle", "fsdp2_spectrum"])
def test_fsdp2_frozen_full_moves_match_one_process(ranks, scenario):
    """FSDP2 reduce-scatters whatever has a gradient: FROZEN ↔ FULL moves of existing weights
    keep ranks identical and equal to one process; Spectrum scores the gathered weights."""
    r0, r1 = _load(ranks, scenario)
    _assert_matches_one_process(r0, r1, distributed_worker.train(scenario))
    assert len(set((r0["modes"] // 100).tolist())) == 2  # some FULL, some FROZEN


def test_fsdp2_static_lora_on_sharded_weights_matches_one_process(ranks):
    """Replicated factors on sharded bases: started alike, gradients averaged over the ranks."""
    r0, r1 = _load(ranks, "fsdp2_lora")
    _assert_matches_one_process(r0, r1, distributed_worker.train("fsdp2_lora"))
    assert set((r0["modes"] // 100).tolist()) == {list(Mode).index(Mode.LORA)}
    initial = distributed_worker.build_model().state_dict()
    assert torch.equal(r0["param/bert.encoder.layer.0.attention.self.query.base.weight"],
                       initial["bert.encoder.layer.0.attention.self.query.weight"])  # the base stayed frozen
    assert float(r0["param/bert.encoder.layer.0.attention.self.query.lora_B"].abs().max()) > 1e-3  # B trained


def test_fsdp2_pissa_on_sharded_weights_matches_one_process(ranks):
    """PiSSA's SVD reads the gathered weight; each rank keeps its rows of the residual."""
    r0, r1 = _load(ranks, "fsdp2_pissa")
    _assert_matches_one_process(r0, r1, distributed_worker.train("fsdp2_pissa"))
    initial = distributed_worker.build_model().state_dict()
    assert not torch.equal(r0["param/bert.encoder.layer.0.attention.self.query.base.weight"],
                           initial["bert.encoder.layer.0.attention.self.query.weight"])  # the residual W − s·BA


def test_fsdp2_refuses_4bit_bases_by_name(ranks):
    r0, r1 = _load(ranks, "fsdp2_4bit")
    assert int(r0["refused"]) == 1 and int(r1["refused"]) == 1


def test_fsdp2_every_transition_and_merge_match_one_process(ranks):
    """LORA → FULL / FROZEN fold into each rank's rows; FROZEN / FULL → LORA start replicated
    factors (rank-specific RNG: only the broadcast makes them agree); rank growth and a cut
    whose remainder folds into the shards; then merge() of every layer on sharded weights."""
    r0, r1 = _load(ranks, "fsdp2_every")
    single = distributed_worker.train("fsdp2_every")
    _assert_matches_one_process(r0, r1, single)
    layers = [n[len("merged/"):] for n in single if n.startswith("merged/")]  # the optimizer's layer order
    ranks_by_layer = dict(zip(layers, (r0["modes"] % 100).tolist()))
    assert ranks_by_layer["bert.encoder.layer.0.output.dense"] == 1  # cut 2 → 1
    assert ranks_by_layer["bert.encoder.layer.0.intermediate.dense"] == 4  # grown 2 → 4, then folded
    assert int(r0["moves"]) == 8 + 6  # the layers EveryMove names at step 2, then at step 4


def test_fsdp2_saves_and_exports_what_one_process_does(ranks, tmp_path):
    """save_adapters, export_merged and export_peft called on every rank of a sharded model write
    the whole tensors: the files match those of one process."""
    distributed_worker.train("fsdp2_every", folder=tmp_path)
    from adaptopt.formats.checkpoint import adapters_file
    pairs = [(adapters_file(ranks / "every-adapters"), adapters_file(tmp_path / "every-adapters"))]
    pairs += [(ranks / folder / file, tmp_path / folder / file) for folder, file in
              (("every-merged", "model.safetensors"), ("every-peft", "adapter_model.safetensors"))]
    for sharded_run, one_process in pairs:
        a, b = load_file(str(sharded_run)), load_file(str(one_process))
        assert a.keys() == b.keys() and a, sharded_run
        for key in a:
            diff = float((a[key].double() - b[key].double()).abs().max())
            assert diff <= 1e-5, f"{sharded_run.name}: {key} differs by {diff:.2e}"


def test_fsdp2_resume_equals_the_uninterrupted_run(ranks):
    """Model and optimizer state dicts of a sharded run (factors born after sharding) load into
    a freshly sharded model and continue exactly as the run that never stopped."""
    for rank in (0, 1):
        resumed = load_file(str(ranks / f"fsdp2_resume.rank{rank}.safetensors"))
        uninterrupted = load_file(str(ranks / f"fsdp2_every.rank{rank}.safetensors"))
        assert resumed.keys() == uninterrupted.keys()
        for name in resumed:
            if name != "moves":  # the resumed optimizer only saw the moves after its restart
                assert torch.equal(resumed[name], uninterrupted[name]), f"rank {rank}: {name} differs after resume"


def test_a_two_rank_fsdp2_checkpoint_continues_in_one_process(ranks):
    """The checkpoint holds whole tensors (model through get_model_state_dict, whole Adam moments),
    so one process continues it as the two ranks did."""
    single = distributed_worker.train("fsdp2_continue", folder=ranks)
    r0, r1 = _load(ranks, "fsdp2_resume")
    for name in (k for k in single if k.startswith(("param/", "merged/"))):
        diff = float((single[name] - r0[name]).abs().max())
        assert diff <= 1e-5, f"{name}: one process vs two ranks after the restart differ by {diff:.2e}"
    assert torch.allclose((r0["losses"][3:] + r1["losses"][3:]) / 2, single["losses"], atol=1e-5)


@pytest.mark.parametrize("scenario", ["fsdp2_automode", "fsdp2_accumulate"])
def test_fsdp2_automode_decides_as_one_process(ranks, scenario):
    """The cheap gradient scores under FSDP2 are those of one process on the global batch (also
    with accumulated micro-batches), so AutoMode takes the same decisions and the run matches
    one process."""
    r0, r1 = _load(ranks, scenario)
    _assert_matches_one_process(r0, r1, distributed_worker.train(scenario))
    assert len(set((r0["modes"] // 100).tolist())) > 1 and int(r0["moves"]) > 0


def test_a_hung_launch_is_killed_with_its_workers_in_their_own_sessions():
    """torchrun starts workers in sessions of their own; the launch helper's time-out must kill
    them too, or a worker stuck in gloo's teardown keeps the pipes open and the suite hangs."""
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import _descendants, _run_in_own_group
    worker = "import time; time.sleep(120)"
    launcher = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', %r], "
                "start_new_session=True); time.sleep(120)" % worker)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        _run_in_own_group([sys.executable, "-c", launcher], dict(os.environ), 3)
    assert time.monotonic() - start < 60
    time.sleep(0.5)
    assert not [pid for pid in _descendants(1) if worker in _cmdline(pid)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
