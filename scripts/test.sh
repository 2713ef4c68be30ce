#!/usr/bin/env bash
# The tests: set up, then pytest (extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-test-deps.sh
exec .venv/bin/python -m pytest "$@"
