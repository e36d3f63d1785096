"""README.md runs as written: its Python blocks, top to bottom in one session (the way a reader
pastes them), and its torchrun block under torchrun with two processes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import torchrun

README = Path(__file__).resolve().parent.parent / "README.md"
TORCHRUN = "# torchrun"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_its_sections_examples():
    text = "\n".join(python_blocks())
    for needed in ("Trainer(", "trl.SFTTrainer(", "AdaptoptLightning()", "AdaptiveDDP(", "export_peft("):
        assert needed in text, needed


@pytest.mark.slow
def test_every_python_block_runs_top_to_bottom(tmp_path, monkeypatch):
    for module in ("transformers", "trl", "lightning", "datasets", "peft", "bitsandbytes"):
        pytest.importorskip(module)
    from adaptopt.integrations.models import ConfigError, model_directory
    try:
        model_directory({"name": "smollm2-135m"})  # the TRL block's offline model
    except ConfigError as err:
        pytest.skip(str(err))
    monkeypatch.chdir(tmp_path)
    session: dict = {"__name__": "__readme__"}
    for i, code in enumerate(python_blocks(), 1):
        if code.startswith(TORCHRUN):
            continue
        exec(compile(code, f"README.md python block {i}", "exec"), session)
    assert (tmp_path / "run" / "final" / "config.json").is_file()        # Trainer's save_model
    assert (tmp_path / "run" / "peft" / "adapter_config.json").is_file()  # the export block


def test_the_torchrun_block_runs_under_torchrun(tmp_path):
    blocks = [code for code in python_blocks() if code.startswith(TORCHRUN)]
    assert len(blocks) == 1
    script = tmp_path / "ddp_block.py"
    script.write_text(blocks[0])
    run = torchrun(script, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
