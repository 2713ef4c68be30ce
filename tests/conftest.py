"""Shared fixtures: the smoke grid is run once per test session (it executes real notebooks), and once for all
pytest-xdist workers: the first to get the lock runs it, the others wait and use its folder. Book builds take
turns: every build gathers the cell notebooks into the repository's book/runs/cells."""

import os
from pathlib import Path

import pytest
from filelock import FileLock

from bnlib import grid, runner

if os.environ.get("PYTEST_XDIST_WORKER"):
    # A core per worker: two workers each spinning torch's default thread pool over both cores run many times
    # slower (measured: a 34 s test of stacked seeds took 265 s).
    import torch

    torch.set_num_threads(1)


def _run_smoke(root: Path) -> None:
    report = runner.run(grid.load("smoke"), root, runner.LocalExecutor(jobs=2, threads=1), progress=False)
    assert report.ok, report.failed


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory) -> Path:
    """A results folder holding the finished smoke grid: results/smoke/runs/*.{ipynb,json} and its tables."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: its own temporary folder
        root = tmp_path_factory.mktemp("results")
        _run_smoke(root)
        return root
    shared = tmp_path_factory.getbasetemp().parent  # the same for every worker of this session
    root = shared / "smoke-results"
    with FileLock(str(shared / "smoke-results.lock")):
        if not (root / ".finished").exists():
            _run_smoke(root)
            (root / ".finished").touch()
    return root


@pytest.fixture(scope="session")
def book_build_lock(tmp_path_factory) -> FileLock:
    """Held around a jupyter-book build of this repository, across pytest-xdist workers."""
    shared = (
        tmp_path_factory.getbasetemp().parent
        if os.environ.get("PYTEST_XDIST_WORKER")
        else tmp_path_factory.getbasetemp()
    )
    return FileLock(str(shared / "book-build.lock"))


# Test files that mostly wait (a Slurm cluster's time limits and requeues; kernels started one after another) go
# first, so that pytest-xdist's workers (a file at a time, in collection order) overlap them with the rest.
FIRST = ("test_slurm.py", "test_grid.py", "test_published.py")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(FIRST)))  # stable: each file keeps its own order
