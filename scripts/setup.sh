#!/usr/bin/env bash
# Set up everything once, into .venv (git-ignored, reused): pinned packages, bnlib (editable), and the
# Jupyter kernel "bnlib" that papermill runs the cell notebooks with. Re-running is instant unless
# pyproject.toml, constraints.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The study's Fashion-MNIST comes from Debian's dataset-fashion-mnist (read in place from
# /usr/share/datasets/fashion-mnist; no download). Installed when missing and we are root with apt-get.
if ! [[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian's dataset-fashion-mnist (the study's Fashion-MNIST)"
        { apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 ||
          { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; }; } ||
            echo "setup: could not install dataset-fashion-mnist; the study grid will say where to put Fashion-MNIST" >&2
    else
        echo "setup: Fashion-MNIST (for the study grid) is not installed: 'sudo apt-get install dataset-fashion-mnist', or let torchvision download it" >&2
    fi
fi

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
