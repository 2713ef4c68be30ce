#!/usr/bin/env bash
# Debian packages the tests use beyond Python: chromium renders the book headless. Installed when missing
# and we are root with apt-get (as in CI); otherwise the test that needs it is skipped with the reason.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: installing chromium from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
else
    echo "install-test-deps: chromium is missing and cannot be installed here; the browser test will be skipped" >&2
fi
