#!/usr/bin/env bash
# The main job: set up, run the default grid (embedded data, resumable), then build the book.
# Extra arguments go to `bnlib run`, e.g. `bash scripts/main.sh -j 4` or `bash scripts/main.sh --force`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
GRID=${GRID:-default}
started=$SECONDS  # the grid and the book, after the set-up (what the README's time is about)
.venv/bin/bnlib run "$GRID" "$@"
.venv/bin/bnlib book --grid "$GRID"
echo "main job: grid $GRID and its book in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
