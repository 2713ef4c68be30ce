"""A Sphinx extension of the book: before the table of contents is read, copy the shown grid's finished
cell notebooks into ``book/runs/cells/``, so that a plain ``jupyter-book build .`` lists them on the Runs
page (the grid and results folder as in :mod:`bnlib.book`: ``study`` from ``results/`` by default)."""

from __future__ import annotations

from . import book


def _gather(app, config) -> None:
    book.gather_runs(book.results_dir() / book.grid_name())


def setup(app):
    # sphinx-external-toc resolves the toc's globs at priority 900; the notebooks must be there before
    app.connect("config-inited", _gather, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
