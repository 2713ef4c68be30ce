#!/usr/bin/env bash
# Debian packages the tests use beyond Python: chromium renders the book headless; Slurm (with munge,
# slurmdbd and MariaDB for accounting) runs a one-node cluster for the Slurm executor's tests.
# Installed when missing and we are root with apt-get (as in CI); otherwise the tests that need them
# are skipped with the reason.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
for exe in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
    command -v "$exe" >/dev/null 2>&1 || { need+=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server); break; }
done
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: installing ${need[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
    echo "install-test-deps: missing ${need[*]} and cannot install them here; the tests that need them will be skipped" >&2
fi
