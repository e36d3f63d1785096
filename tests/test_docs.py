"""The documentation runs as written: every Python block of README.md and of each page in docs/,
top to bottom in one session per page (the way a reader pastes them), and every ``# torchrun``
block under torchrun with two processes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import torchrun

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TORCHRUN = "# torchrun"
# pages whose blocks load the real SmolLM2 (the TRL example): a minute, so marked slow
REAL_MODEL_PAGES = {"integrations.md"}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_readme_is_a_front_door():
    """About 400 lines at most: what it is, the two commands, the main table, one quick start per
    path, and links to the manual."""
    text = README.read_text()
    assert len(text.splitlines()) <= 400
    for needed in ("bash scripts/demo.sh", "bash scripts/test.sh", "Which policy pays", "AdaptiveOptimizer(model",
                   "Trainer(", "AdaptoptLightning()", "export_peft(", "torchrun --nproc_per_node 2", "adaptopt train"):
        assert needed in text, needed
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"


def test_every_page_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.name} links {target}"


def test_every_file_a_page_names_exists():
    """A page that names a file of the repository (``adaptopt/…/x.py``, ``tests/…``, ``scripts/…``)
    names one that is there: modules move, and the prose must move with them."""
    for page in PAGES:
        for path in set(re.findall(r"\b((?:adaptopt|integrations|tests|scripts|examples)/[\w/.-]+\.(?:py|sh|yaml))",
                                   page.read_text())):
            assert (ROOT / path).is_file(), f"{page.name} names {path}, which is not in the repository"


def _session(page: Path, tmp_path: Path, monkeypatch) -> None:
    for module in ("transformers", "lightning", "peft", "bitsandbytes"):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    session: dict = {"__name__": f"__{page.stem}__"}
    blocks = [code for code in python_blocks(page) if not code.startswith(TORCHRUN)]
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"{page.name} python block {i}", "exec"), session)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p) and p.name not in REAL_MODEL_PAGES],
                         ids=lambda p: p.name)
def test_every_python_block_runs_top_to_bottom(page, tmp_path, monkeypatch):
    _session(page, tmp_path, monkeypatch)
    if page == README:
        assert (tmp_path / "run" / "final" / "config.json").is_file()        # Trainer's save_model
        assert (tmp_path / "run" / "peft" / "adapter_config.json").is_file()  # the export block


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p.name in REAL_MODEL_PAGES], ids=lambda p: p.name)
def test_pages_with_the_real_model_run_top_to_bottom(page, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from adaptopt.cli.models import ConfigError, model_directory
    try:
        model_directory({"name": "smollm2-135m"})  # the TRL block's offline model
    except ConfigError as err:
        pytest.skip(str(err))
    _session(page, tmp_path, monkeypatch)
    assert (tmp_path / "run" / "sft" / "final" / "config.json").is_file()


def test_the_torchrun_block_runs_under_torchrun_and_ranks_agree(tmp_path):
    blocks = [code for page in PAGES for code in python_blocks(page) if code.startswith(TORCHRUN)]
    assert len(blocks) == 1
    script = tmp_path / "ddp_block.py"
    script.write_text(blocks[0])
    run = torchrun(script, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    # the two ranks share one pipe: a line of one may land before the other's newline
    reports = dict(re.findall(r"rank (\d+): (\d+ steps, \d+ transitions, [-+.e\d]+?)(?=rank |\s|$)", run.stdout))
    assert sorted(reports) == ["0", "1"], run.stdout
    steps, transitions, checksum = reports["0"].split(", ")
    assert steps == "12 steps" and int(transitions.split()[0]) > 0  # AutoMode moved layers
    assert reports["0"] == reports["1"]  # same steps, moves and weights on both
