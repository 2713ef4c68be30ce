"""Shared fixtures: the smoke grid is run once per test session (it executes real notebooks)."""

from pathlib import Path

import pytest

from bnlib import grid, runner


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory) -> Path:
    """A results folder holding the finished smoke grid: results/smoke/runs/*.{ipynb,json} and its tables."""
    root = tmp_path_factory.mktemp("results")
    report = runner.run(grid.load("smoke"), root, runner.LocalExecutor(jobs=2, threads=1), progress=False)
    assert report.ok, report.failed
    return root
