"""The paper: what the book's pages and the README compute from ``results/``. One module per page or chapter
(:mod:`.study`, :mod:`.original`, :mod:`.mechanism` and its :mod:`.reversal`, :mod:`.controls`), the words and
tables they share (:mod:`.words`, :mod:`.tables`), the answer the intro and the Summary tell by hand with the claims
its sentences make (:mod:`.answer`) and the checks that hold those sentences to the tables (:mod:`.guards`), the
README writer (:mod:`.readme`) and the site build (:mod:`.site`). Pages glue every number they print, so no number
is typed; a plain ``jupyter-book build .`` builds the published book from the committed ``results/study/`` without
training.
"""

from . import answer, controls, guards, mechanism, original, readme, reversal, site, study, tables, words

__all__ = [
    "answer",
    "controls",
    "guards",
    "mechanism",
    "original",
    "readme",
    "reversal",
    "site",
    "study",
    "tables",
    "words",
]
