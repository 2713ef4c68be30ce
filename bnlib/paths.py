"""Every path of the repository and its environment overrides, resolved to absolute paths once.

Nothing else in ``bnlib`` computes the repository root. A command works the same from any folder: the
results folder defaults to the repository's ``results/`` (not the working folder); ``--results`` or
``$BNLIB_RESULTS`` override it, a relative override taken from the folder the command is typed in.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository (bnlib is installed editable from it)
PACKAGE = ROOT / "bnlib"
GRIDS = ROOT / "grids"
BOOK = ROOT / "book"
NOTEBOOK = BOOK / "notebooks" / "run.ipynb"  # the cell notebook papermill runs once per grid cell
BOOK_DATA = BOOK / "data"  # committed data the book reads (the original study's numbers, saved benchmarks)
BOOK_CELLS = BOOK / "runs" / "cells"  # the executed cell notebooks, gathered at every build (git-ignored)
BOOK_TABLES = (
    BOOK / "runs" / "tables"
)  # the grid's aggregated tables, gathered at every build for download (git-ignored)
README = ROOT / "README.md"
README_FIGURE = BOOK / "figures" / "headline.png"  # the headline figure on the README's first screen
BOOK_CONFIG = ROOT / "_config.yml"
REPRODUCED_TRAINING_CODE = PACKAGE / "reproduced_training_code.yaml"


def results_root(override: str | os.PathLike | None = None) -> Path:
    """The results folder: ``override`` (``--results``), else ``$BNLIB_RESULTS``, else ``<repository>/results``;
    relative paths are taken from the working folder."""
    chosen = override if override is not None else os.environ.get("BNLIB_RESULTS")
    return Path(chosen).resolve() if chosen else ROOT / "results"


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The torchvision datasets' folder: ``override`` (a grid's ``data_dir``), else ``$BNLIB_DATA``, else
    ``<repository>/data``."""
    chosen = override if override is not None else os.environ.get("BNLIB_DATA")
    return Path(chosen).resolve() if chosen else ROOT / "data"


def grid_results(grid_name: str, results: str | os.PathLike | None = None) -> Path:
    """``<results>/<grid>``: a grid's tables, its runner log and lock."""
    return results_root(results) / grid_name


def runs_dir(grid_name: str, results: str | os.PathLike | None = None) -> Path:
    """``<results>/<grid>/runs``: the executed notebook and metrics file of every cell."""
    return grid_results(grid_name, results) / "runs"
