"""The checks behind the book's hand-written sentences. A page states a verdict or a direction in prose written by
hand, with its numbers glued in; a cell beside it (input hidden) calls :func:`guard` with the sentence's name and the
condition on the tables that makes it true. On the published grid a failed guard stops the build (the sentence no
longer holds: rewrite it); on any other grid the prose was not written for it, so the page shows a note under the
sentence and the build goes on. ``tests/test_guards.py`` breaks each guard's supporting row in a copy of
the tables and checks that the page then fails.
"""

from __future__ import annotations

import re

from IPython.display import Markdown, display

from .tables import PUBLISHED_GRID, grid_name

# how a page names a guarded sentence: guard("intro: bnrs below at every batch", ...) - page, colon, what it says
NAME = re.compile(r"^[a-z-]+: .+$")


class UnsupportedSentence(AssertionError):
    """A hand-written sentence of the published book that the tables no longer support."""


def guard(name: str, holds: bool, evidence: str) -> None:
    """Check the sentence ``name`` (``'<page>: <what it says>'``) against the tables: ``holds`` is the condition,
    ``evidence`` the numbers it was read from, quoted in the failure."""
    if not NAME.match(name):
        raise ValueError(f"guard name {name!r}: write it as '<page>: <what the sentence says>'")
    if bool(holds):
        return
    if grid_name() == PUBLISHED_GRID:
        raise UnsupportedSentence(f"[{name}] no longer holds: {evidence}. Rewrite the sentence or check the tables.")
    display(
        Markdown(  # a Markdown output is read as CommonMark (no directives): a quoted note
            f"> **Not so for this grid.** The sentence above ('{name.split(': ', 1)[1]}') was written for the "
            f"published study and does not hold for the grid `{grid_name()}` shown here ({evidence})."
        )
    )
