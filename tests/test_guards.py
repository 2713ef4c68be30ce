"""The hand-written sentences of the intro and the Summary are held to the tables: each claim a page makes
(:data:`bnlib.paper.answer.CLAIMS`) is checked by a hidden cell, and breaking the claim's supporting row in a copy
of the committed tables makes that page fail, naming the sentence. Only the pages' hidden cells run (the tables
and the checks), not their figures: a page per claim in a few seconds, not a book build."""

import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from myst_nb.core.read import read_myst_markdown_notebook
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from bnlib import analysis, paths
from bnlib.paper import answer, guards, tables

ROOT = paths.ROOT
GRIDS = ("study", "mechanism", "mechanism-batchstats")  # what the answer reads
PAGES = ("intro", "mechanism", "summary")
HAS_RESULTS = all((ROOT / "results" / g / "summary.csv").exists() for g in GRIDS)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_RESULTS, reason="the committed study is not here")]


def _edit(path: Path, where: dict, column: str, value) -> None:
    """Set ``column`` to ``value`` in the rows of a CSV matching ``where`` (at least one row must match)."""
    frame = pd.read_csv(path)
    rows = pd.Series(True, index=frame.index)
    for key, wanted in where.items():
        rows &= frame[key].isna() if wanted is None else frame[key] == wanted
    assert rows.any(), (path, where)
    frame.loc[rows, column] = value
    frame.to_csv(path, index=False)


ONE_CLASS = {"sampler": "noniid", "classes_per_batch": 1, "batch_size": 2}
# claim -> how to take its support away in a copy of the results folder (the file, the rows, the new value)
BREAKS = {
    "BNRS is below BN at every i.i.d. batch size": (
        "study/summary.csv",
        {"method": "bnrs", "sampler": "iid", "batch_size": 128},
        "verdict",
        "cannot tell",
    ),
    "BRN wins back nearly all of BNRS's loss": (
        "study/summary.csv",
        {"method": "brn", "sampler": "iid", "batch_size": 16},
        "diff_vs_bn",
        -0.05,
    ),
    "leaving out the normalising backward pass costs accuracy with either statistics": (
        "mechanism/analysis.csv",
        {"comparison": analysis.SIMPLE[3], "sampler": "iid", "batch_size": 16, "outcome": "accuracy"},
        "verdict",
        "cannot tell",
    ),
    "running statistics, backward pass kept, cost a tenth of leaving it out or less": (
        "mechanism/analysis.csv",
        {"comparison": analysis.SIMPLE[0], "sampler": "iid", "batch_size": 16, "outcome": "accuracy"},
        "mean",
        -0.05,
    ),
    "GroupNorm is above BN at the smallest i.i.d. batch": (
        "study/summary.csv",
        {"method": "gn", "sampler": "iid", "batch_size": 2},
        "verdict",
        "cannot tell",
    ),
    "BN plateaued at every i.i.d. batch size": (
        "study/plateau.csv",
        {"method": "bn", "sampler": "iid", "batch_size": 2},
        "plateaued",
        False,
    ),
    "with one-class batches BNRS, BRN and GroupNorm beat BN": (
        "study/summary.csv",
        {"method": "gn", **ONE_CLASS},
        "verdict",
        "cannot tell",
    ),
    "BN had not plateaued with one-class batches": (
        "study/plateau.csv",
        {"method": "bn", **ONE_CLASS},
        "plateaued",
        True,
    ),
    "one-class BN networks work with the test batches' own statistics": (
        "mechanism-batchstats/summary_batchstats.csv",
        {"method": "bn", **ONE_CLASS},
        "mean",
        0.10,
    ),
}


def _tables_copy(tmp: Path) -> Path:
    """The grids' tables (no run records: the answer reads only the aggregates) in a fresh results folder."""
    for g in GRIDS:
        (tmp / g).mkdir(parents=True)
        for f in (ROOT / "results" / g).glob("*.csv"):
            shutil.copy(f, tmp / g / f.name)
    return tmp


def _run_hidden_cells(page: str, results: Path, monkeypatch) -> None:
    """Execute the page's hidden cells (tables, glue and checks) on ``results`` as the published grid."""
    nb = read_myst_markdown_notebook((ROOT / "book" / f"{page}.md").read_text())
    nb.cells = [  # the setup cells (hidden) and the checks
        c
        for c in nb.cells
        if c.cell_type == "code" and ("remove-cell" in c.metadata.get("tags", []) or "answer.check(" in c.source)
    ]
    monkeypatch.setenv("BNLIB_RESULTS", str(results))  # the kernel inherits it
    monkeypatch.delenv("BNLIB_BOOK_GRID", raising=False)
    NotebookClient(nbformat.from_dict(nb), timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()


def _pages_checking(claim: str) -> list[str]:
    """The pages whose checks name ``claim``, or the answer's short version that makes it."""

    def names(source: str) -> bool:
        return f'"{claim}"' in source or ("IN_SHORT_CLAIMS" in source and claim in answer.IN_SHORT_CLAIMS)

    return [p for p in PAGES if names((ROOT / "book" / f"{p}.md").read_text())]


def test_every_claim_is_checked_on_a_page_and_can_be_broken():
    assert set(BREAKS) == set(answer.CLAIMS)
    assert all(_pages_checking(claim) for claim in answer.CLAIMS), {c: _pages_checking(c) for c in answer.CLAIMS}


@pytest.mark.parametrize("page", PAGES)
def test_the_committed_tables_support_every_sentence(page, tmp_path, monkeypatch):
    _run_hidden_cells(page, _tables_copy(tmp_path), monkeypatch)


@pytest.mark.parametrize("claim", sorted(BREAKS))
def test_a_page_fails_when_its_sentence_loses_its_support(claim, tmp_path, monkeypatch):
    results = _tables_copy(tmp_path)
    file, where, column, value = BREAKS[claim]
    _edit(results / file, where, column, value)
    for page in _pages_checking(claim):
        with pytest.raises(CellExecutionError, match="UnsupportedSentence") as failed:
            _run_hidden_cells(page, results, monkeypatch)
        assert f"[{page}: {claim}]" in str(failed.value)


def test_another_grid_shows_a_warning_in_the_sentence_s_place(monkeypatch, capsys):
    monkeypatch.setenv("BNLIB_BOOK_GRID", "smoke")
    shown = []
    monkeypatch.setattr(guards, "display", shown.append)
    guards.guard("intro: BN wins", False, "BN's verdict 'below'")
    assert "written for the published study" in shown[0].data and "smoke" in shown[0].data
    monkeypatch.setenv("BNLIB_BOOK_GRID", tables.PUBLISHED_GRID)
    with pytest.raises(guards.UnsupportedSentence, match=r"\[intro: BN wins\].*'below'"):
        guards.guard("intro: BN wins", False, "BN's verdict 'below'")
    with pytest.raises(ValueError, match="<page>: "):
        guards.guard("no page named", True, "")
