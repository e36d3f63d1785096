#!/usr/bin/env bash
# Set up .venv and run the main job: MiniLM-L6 fine-tuned on Rotten Tomatoes snippets (held-out
# movies) with five methods × three paired seeds; prints the paired table, writes it, the Pareto
# plot and every run's plots to runs/demo (about 23 minutes on 2 CPU cores). Extra arguments go to
# `adaptopt demo` (`--quick`: a first look in a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/adaptopt demo "$@"
