"""What made a result: the code's fingerprints, the commit, the machine. Recorded in every metrics file.

A finished cell is *stale* when the training code that ran it is neither the current code nor one the current
code is known to reproduce (the data file ``bnlib/reproduced_training_code.yaml``, each entry with its
evidence). The fingerprint of the training code covers every file of the packages a cell's numbers depend on
(``bnlib/train/`` and ``bnlib/norms/``) and the cell notebook, so a module split, added or renamed there cannot drop
out of it.
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
from pathlib import Path

import yaml

from . import machine, paths
from .record import Provenance

# The packages a cell's numbers depend on -- every module in them, at any depth, with the cell notebook: a change to
# them makes finished cells stale. A file moved, added or split inside them is covered without anyone listing it.
TRAINING_PACKAGES = ("train", "norms")
# The only modules outside those packages that the training code may import: the contracts it meets at (the run
# record, the paths, the provenance it records). tests/test_house.py fails on any other import.
TRAINING_CONTRACTS = ("record", "paths", "provenance")


def training_files() -> list[Path]:
    """Every module of :data:`TRAINING_PACKAGES`, at any depth, in a fixed order."""
    return sorted(f for pkg in TRAINING_PACKAGES for f in (paths.PACKAGE / pkg).rglob("*.py"))


def code_fingerprint(files: list[Path] | None = None) -> str:
    """sha256 of the code a cell runs: ``files`` of bnlib (default: every ``.py`` file of the package, at any depth),
    each keyed by its path relative to ``bnlib/``, and the cell notebook (what git's dirty flag cannot tell apart)."""
    files = sorted(paths.PACKAGE.rglob("*.py")) if files is None else files
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(paths.PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(paths.NOTEBOOK.name.encode() + b"\0" + paths.NOTEBOOK.read_bytes() + b"\0")
    return digest.hexdigest()


# Taken when the module is imported (a cell's kernel imports it before training), not when the metrics
# file is written: an edit to bnlib during a long cell must not be credited to that cell.
CODE_SHA256 = code_fingerprint()
TRAINING_SHA256 = code_fingerprint(training_files())


def reproduced_training_code() -> dict[str, str]:
    """Fingerprint -> evidence of every earlier training code whose cells the current code reproduces."""
    entries = yaml.safe_load(paths.REPRODUCED_TRAINING_CODE.read_text()) or []
    return {e["training_code_sha256"]: e["note"] for e in entries}


REPRODUCED_TRAINING_CODE = reproduced_training_code()


def is_current(training_code_sha256: str | None) -> bool:
    """Whether a cell recorded with this training-code fingerprint counts as run by the current code
    (files written before the fingerprint existed do)."""
    return (
        not training_code_sha256
        or training_code_sha256 == TRAINING_SHA256
        or training_code_sha256 in REPRODUCED_TRAINING_CODE
    )


def git_commit() -> str | None:
    """HEAD of the repository, with ``-dirty`` when tracked files differ from it."""

    def run(*args):
        return subprocess.run(["git", *args], cwd=paths.ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
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
        versions=versions,
        python=sys.version.split()[0],
        git_commit=git_commit(),
        code_sha256=CODE_SHA256,
        training_code_sha256=TRAINING_SHA256,
        host=socket.gethostname(),
        platform=platform.platform(),
        device=device,
        device_name=device_name(device),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        slurm_array_job_id=os.environ.get("SLURM_ARRAY_JOB_ID"),
        slurm_array_task_id=os.environ.get("SLURM_ARRAY_TASK_ID"),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        numerics=machine.numerics(device),
    )
