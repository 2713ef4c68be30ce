"""Integrity of a committed (published) grid folder, ``results/<grid>/``: what CI checks before it builds.

Every metrics file parses and names its own cell; every finished cell has its executed notebook and the
notebook parses; the aggregated CSVs are present and equal a fresh aggregation of the metrics files. A
problem raises :class:`PublishedError` naming the file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nbformat
import pandas as pd

from . import tables
from .record import CorruptRun, read_run

TABLES = ("evaluations", "training_loss", "summary")


class PublishedError(RuntimeError):
    """A committed result file is missing, corrupt or out of date; the message names it."""


def check(grid_dir: str | Path) -> int:
    """Check ``results/<grid>/``; returns the number of finished cells."""
    grid_dir = Path(grid_dir)
    runs = grid_dir / "runs"
    metrics = sorted(runs.glob("*.json"))
    if not metrics:
        raise PublishedError(f"{runs}: no committed metrics files")
    for path in metrics:
        try:
            run = read_run(path)
        except CorruptRun as err:
            raise PublishedError(f"{err}; restore it from git or re-run its cell") from None
        if run.stopped_at_step:
            raise PublishedError(f"{path}: a prefix re-execution (stopped at step {run.stopped_at_step} by `bnlib verify "
                                 "--steps`), not a finished cell; restore it from git or re-run its cell")
        notebook = path.with_suffix(".ipynb")
        if not notebook.exists():
            raise PublishedError(f"{notebook}: missing (the notebook of finished cell {path.stem})")
        try:
            nbformat.read(notebook, as_version=4)
        except Exception as err:  # noqa: BLE001 - any parse failure is a corrupt notebook
            raise PublishedError(f"{notebook}: not a readable notebook ({err})") from None
    for name in TABLES:
        if not (grid_dir / f"{name}.csv").exists():
            raise PublishedError(f"{grid_dir / f'{name}.csv'}: missing; run `bnlib aggregate {grid_dir.name}` and commit it")
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / grid_dir.name
        (fresh / "runs").mkdir(parents=True)
        for path in metrics:
            (fresh / "runs" / path.name).symlink_to(path.resolve())
        written = tables.aggregate(fresh)
        for name, path in written.items():
            committed = grid_dir / path.name
            if not committed.exists():
                raise PublishedError(f"{committed}: missing; run `bnlib aggregate {grid_dir.name}` and commit it")
            try:
                pd.testing.assert_frame_equal(pd.read_csv(committed), pd.read_csv(path), check_exact=False, rtol=1e-9)
            except AssertionError as err:
                raise PublishedError(f"{committed}: differs from a fresh aggregation of {runs} ({str(err).splitlines()[0]}); "
                                     f"run `bnlib aggregate {grid_dir.name}` and commit it") from None
    return len(metrics)
