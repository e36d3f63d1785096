"""The package as users get it: core imports with torch alone; integrations ship as adaptopt.integrations."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_core_imports_without_optional_dependencies(tmp_path):
    code = ("import sys\n"
            "for name in ('transformers', 'datasets', 'matplotlib', 'peft', 'bitsandbytes', 'yaml'):\n"
            "    sys.modules[name] = None\n"
            "import adaptopt, torch\n"
            "m = adaptopt.LoRALinear(torch.nn.Linear(4, 4))\n"
            "print(type(m).__name__, sorted(k for k, v in sys.modules.items()\n"
            "      if v is not None and k.startswith('transformers')))")
    assert run_python(code, tmp_path) == "LoRALinear []"


def test_installed_package_exposes_integrations(tmp_path):
    """The development (editable) install maps integrations/ to adaptopt.integrations."""
    out = run_python("import adaptopt.integrations as i; print(i.__file__)", tmp_path)
    assert Path(out) == ROOT / "integrations" / "__init__.py"


def test_wheel_ships_integrations_inside_adaptopt(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("adaptopt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "adaptopt/integrations/__init__.py" in names and "adaptopt/layers/lora.py" in names
    assert not any(name.startswith(("integrations/", "tests/")) for name in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    out = run_python("import adaptopt.integrations as i, adaptopt; print(adaptopt.__file__, i.__file__)", tmp_path,
                     PYTHONPATH=str(target))
    assert out == f"{target / 'adaptopt' / '__init__.py'} {target / 'adaptopt' / 'integrations' / '__init__.py'}"
    for package in ("layers", "surgery", "training", "formats", "policies", "scores", "cli"):
        assert f"adaptopt/{package}/__init__.py" in names, package
    assert "adaptopt/cli/configs/main_job.yaml" in names  # the demo config is package data
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "adaptopt = adaptopt.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # the console entry point, run from the installed wheel: its shipped config resolves inside the install
    out = run_python("import sys; from adaptopt.cli.main import config_path, main; print(config_path('main_job')); "
                     "sys.argv = ['adaptopt', '--help']; main()", tmp_path, PYTHONPATH=str(target))
    assert out.splitlines()[0] == str(target / "adaptopt" / "cli" / "configs" / "main_job.yaml")
    assert "demo" in out and "compare" in out


@pytest.mark.parametrize("offline", ["0", "1"])
def test_importing_adaptopt_then_the_trainer_prints_no_optional_kernel_notice(offline):
    env = {**os.environ, "HF_HUB_OFFLINE": offline}  # offline, "kernels" adds a publisher-check notice
    quiet = subprocess.run([sys.executable, "-c", "import adaptopt; from transformers import Trainer"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert quiet.returncode == 0 and "kernels-community" not in quiet.stderr + quiet.stdout
    shown = subprocess.run([sys.executable, "-c", "import logging; logging.getLogger('bitsandbytes').setLevel("
                            "logging.DEBUG); import adaptopt; from transformers import Trainer"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    if "kernels-community" not in shown.stderr:  # a machine where the kernel loads has nothing to hide
        pytest.skip("bitsandbytes printed no notice here")
