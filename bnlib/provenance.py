"""What made a result: the code's fingerprints, the commit, the machine. Recorded in every metrics file.

A finished cell is *stale* when the training code that ran it is neither the current code nor one the current
code is known to reproduce (the data file ``bnlib/reproduced_training_code.yaml``, each entry with its
evidence). The fingerprint of the training code covers the modules a cell's numbers depend on and the cell
notebook; a listed file that does not exist is an error, so a module split or renamed cannot drop out of it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata

import yaml

from . import machine, paths
from .record import Provenance

# The modules a cell's numbers depend on (with the cell notebook): a change to them makes finished cells stale.
TRAINING_CODE = ("checkpoint.py", "compiling.py", "data.py", "evaluate.py", "models.py", "norms.py", "stacked.py", "traces.py", "train.py")


def code_fingerprint(modules: tuple[str, ...] | None = None) -> str:
    """sha256 of the code a cell runs: ``modules`` of bnlib (default: every ``bnlib/*.py``) and the cell
    notebook (what git's dirty flag cannot tell apart)."""
    files = sorted(paths.PACKAGE.glob("*.py")) if modules is None else [paths.PACKAGE / m for m in sorted(modules)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"the training-code fingerprint lists {', '.join(missing)}, which do not exist: "
                                "update bnlib.provenance.TRAINING_CODE")
    digest = hashlib.sha256()
    for path in files + [paths.NOTEBOOK]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# Taken when the module is imported (a cell's kernel imports it before training), not when the metrics
# file is written: an edit to bnlib during a long cell must not be credited to that cell.
CODE_SHA256 = code_fingerprint()
TRAINING_SHA256 = code_fingerprint(TRAINING_CODE)


def reproduced_training_code() -> dict[str, str]:
    """Fingerprint -> evidence of every earlier training code whose cells the current code reproduces."""
    entries = yaml.safe_load(paths.REPRODUCED_TRAINING_CODE.read_text()) or []
    return {e["training_code_sha256"]: e["note"] for e in entries}


REPRODUCED_TRAINING_CODE = reproduced_training_code()


def is_current(training_code_sha256: str | None) -> bool:
    """Whether a cell recorded with this training-code fingerprint counts as run by the current code
    (files written before the fingerprint existed do)."""
    return (not training_code_sha256 or training_code_sha256 == TRAINING_SHA256
            or training_code_sha256 in REPRODUCED_TRAINING_CODE)


def git_commit() -> str | None:
    """HEAD of the repository, with ``-dirty`` when tracked files differ from it."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=paths.ROOT, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        commit, dirty = run("rev-parse", "HEAD"), run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return machine.cpu_info()["cpu_model_name"] or platform.machine()


def provenance(device: str = "cpu") -> Provenance:
    """Where and with what a run was made: versions, commit, code fingerprints, host, hardware."""
    import torch

    versions = {}
    for pkg in ("bnlib", "torch", "torchvision", "numpy", "scipy", "pandas", "papermill", "scikit-learn", "mlxtend"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return Provenance(
        versions=versions, python=sys.version.split()[0], git_commit=git_commit(), code_sha256=CODE_SHA256,
        training_code_sha256=TRAINING_SHA256, host=socket.gethostname(), platform=platform.platform(), device=device,
        device_name=device_name(device), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"), slurm_array_job_id=os.environ.get("SLURM_ARRAY_JOB_ID"),
        slurm_array_task_id=os.environ.get("SLURM_ARRAY_TASK_ID"), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        numerics=machine.numerics(device),
    )
