#!/usr/bin/env bash
# Set up .venv and run the main job. Until the `adaptopt` CLI lands (issue 6) this is the
# raw-loop example: inject LoRA into a tiny BERT, train, promote a block to FULL mid-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/raw_loop.py "$@"
