"""A Sphinx extension of the book: before the table of contents is read, take this checkout's build lock (held
until the build finishes, so two builds take turns) and copy the shown grid's finished cell notebooks into
``book/runs/cells/``, so that a plain ``jupyter-book build .`` lists them on the Runs
page (the grid and results folder as in :mod:`bnlib.paper.tables`: ``study`` from ``results/`` by default); and
point the launch buttons at notebooks that exist in the repository."""

from __future__ import annotations

import html
import re
from pathlib import Path

from docutils import nodes

from . import paper


def _gather(app, config) -> None:
    # held until the build finishes: the gathered pages are read throughout, and another build would replace them
    app.bnlib_build_lock = paper.site.hold_build_lock()
    paper.site.gather_runs(paper.tables.results_dir() / paper.tables.grid_name())


def _release(app, exception) -> None:
    lock = getattr(app, "bnlib_build_lock", None)
    if lock is not None:
        lock.close()


def _launch_committed_notebooks(app, pagename, templatename, context, doctree) -> None:
    """Binder and Colab open notebooks from the repository: a cell page's notebook is committed under
    ``results/<grid>/runs/`` (``book/runs/cells/`` is a build-time copy), and a MyST page is no notebook
    to them (Colab cannot open it, Binder would show its text), so MyST pages get no launch buttons."""
    buttons = context.get("header_buttons") or []
    for group in buttons:
        if group.get("label") != "launch-buttons":
            continue
        if pagename.startswith("book/runs/cells/"):
            committed = f"results/{paper.tables.grid_name()}/runs/{pagename.rsplit('/', 1)[1]}.ipynb"
            for button in group["buttons"]:
                button["url"] = button["url"].replace(f"{pagename}.ipynb", committed)
        elif context.get("page_source_suffix") != ".ipynb":
            group["buttons"] = []
    context["header_buttons"] = [g for g in buttons if g.get("label") != "launch-buttons" or g["buttons"]]


def _alt_text(app, doctree) -> None:
    """Every figure's alt text: an SVG output's own title (:func:`bnlib.plots.describe`, written by the book's
    pages); a cell page's curves say whose they are. An alt text set on the page itself is kept."""
    docname = app.env.docname
    for image in doctree.findall(nodes.image):
        uri = image.get("uri", "")
        if image.get("alt") and image["alt"] != uri:
            continue
        # myst-nb's outputs: "/<path from the source folder>"; after Sphinx's image collector, a path from it
        candidates = [Path(app.srcdir) / uri.lstrip("/"), Path(app.srcdir) / Path(docname).parent / uri]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        title = None
        if path.suffix == ".svg" and path.is_file():
            found = re.search(r"<dc:title>(.*?)</dc:title>", path.read_text(errors="replace"), re.S)
            title = found and html.unescape(found.group(1)).strip()
        if not title and docname.startswith("book/runs/cells/"):
            title = (
                f"Cell {docname.rsplit('/', 1)[1]}: training loss and test accuracy over the steps, a line per method."
            )
        if title:
            image["alt"] = title


def setup(app):
    # sphinx-external-toc resolves the toc's globs at priority 900; the notebooks must be there before
    app.connect("config-inited", _gather, priority=100)
    # after sphinx-book-theme adds its launch buttons (priority 501), before the page is rendered
    app.connect("html-page-context", _launch_committed_notebooks, priority=502)
    app.connect("doctree-read", _alt_text)
    app.connect("build-finished", _release)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
