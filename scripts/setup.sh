#!/usr/bin/env bash
# Create .venv (if missing) and install adaptopt with the extras named in $EXTRAS.
# torch is pinned by constraints.txt to the CPU build, before anything else can pull it.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-dev,hf,quant,plot}"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[${EXTRAS}]"
.venv/bin/python -c "import torch, adaptopt, adaptopt.integrations; print('adaptopt', adaptopt.__version__, '| torch', torch.__version__)"
