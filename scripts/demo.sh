#!/usr/bin/env bash
# Set up .venv and run the main job: MiniLM-L6 fine-tuned on Rotten Tomatoes snippets (held-out
# movies) with seven methods × two seeds; prints the comparison table, writes it and the plots
# to runs/demo (about 30 minutes on 2 CPU cores). Extra arguments go to `adaptopt demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/adaptopt demo "$@"
