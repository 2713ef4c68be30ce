#!/usr/bin/env bash
# The main job: set up, run the default grid (embedded data, resumable), then build the book.
# Extra arguments go to `bnlib run`, e.g. `bash scripts/main.sh -j 4` or `bash scripts/main.sh --force`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
GRID=${GRID:-default}
.venv/bin/bnlib run "$GRID" "$@"
.venv/bin/bnlib book --grid "$GRID"
