#!/usr/bin/env bash
# Set up everything once, into .venv (git-ignored, reused): pinned packages, bnlib (editable), and the
# Jupyter kernel "bnlib" that papermill runs the cell notebooks with. Re-running is instant unless
# pyproject.toml, constraints.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.bnlib-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

"$PYTHON" - <<'PY' || { echo "setup: Python 3.10 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(sys.version_info < (3, 10))
PY
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
echo "setup: installing pinned packages into .venv (torch is large: a few minutes the first time)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
.venv/bin/python -m ipykernel install --sys-prefix --name bnlib --display-name "Python (bnlib)" >/dev/null
echo "$want" > "$stamp"
echo "setup: ready (.venv, kernel 'bnlib')"
