"""Building the site: the Runs page's table and cell notebooks, the all-results page's scrolling tables, and the
offline ``jupyter-book`` build with its configuration.
"""

from __future__ import annotations

import base64
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pandas as pd
import yaml

from .. import paths
from .. import tables as tables_mod
from ..record import RunRecord, read_run
from .tables import PUBLISHED_GRID, TABLE_FILES
from .words import DATASET_NAMES

CELLS_DIR = paths.BOOK_CELLS


def runs_table(runs: list[RunRecord]) -> str:
    """The Runs page's table: one row per finished cell, linked to its notebook page (HTML)."""
    import html as html_mod

    rows = []
    for r in sorted(runs, key=lambda r: r.cell):
        cfg, prov = r.config, r.provenance
        rows.append(
            {
                "cell": f'<a href="cells/{r.cell}.html">{html_mod.escape(r.cell)}</a>',
                "dataset": cfg["dataset"],
                "budget": tables_mod.budget_label(cfg),
                "batch": cfg["batch_size"],
                "sampler": cfg["sampler"]
                + (f" ({cfg['classes_per_batch']} classes)" if cfg.get("classes_per_batch") else ""),
                "placement": cfg.get("norm_placement", "all"),
                "seed": cfg["seed"],
                "training (s)": round(r.wall_seconds, 1),
                "device": prov.device_name,
                "commit": (prov.git_commit or "")[:12],
            }
        )
    table = pd.DataFrame(rows).to_html(index=False, escape=False, classes="table bnlib-sortable", table_id="runs-table")
    return table + SORT_SCRIPT


# Click a column header of a .bnlib-sortable table to sort by it (again: reverse); numbers sort as numbers.
SORT_SCRIPT = """<script>
document.querySelectorAll("table.bnlib-sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.style.cursor = "pointer";
    th.title = "sort by this column";
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows), up = th.dataset.order !== "up";
      var key = function (row) { var t = row.cells[col].textContent.trim(), n = parseFloat(t); \
return isNaN(n) || String(n) !== t && !/^-?[0-9.]+$/.test(t) ? t : n; };
      rows.sort(function (a, b) { var x = key(a), y = key(b); \
var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1); \
return up ? c : -c; });
      rows.forEach(function (row) { body.appendChild(row); });
      th.dataset.order = up ? "up" : "down";
    });
  });
});
</script>"""


def scrolling_table(frame: pd.DataFrame, max_height_em: int = 30) -> str:
    """A table as HTML in a box that scrolls both ways (the appendix's full tables: wider than the column)."""
    return (
        f'<div class="bnlib-scroll" style="overflow:auto; max-height:{max_height_em}em">'
        + frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", classes="table")
        + "</div>"
    )


BUILD_LOCK = paths.BOOK / "runs" / ".build.lock"


def hold_build_lock():
    """Wait for, then hold, this checkout's book-build lock (``fcntl.flock`` on :data:`BUILD_LOCK`; the kernel
    releases it when the holder closes it, exits or dies). A build gathers the shown grid's notebooks and tables into
    the source tree (:func:`gather_runs`) and reads them until it finishes, so two builds of one checkout take turns
    instead of deleting each other's pages. Returns the open handle: closing it releases the lock."""
    BUILD_LOCK.parent.mkdir(parents=True, exist_ok=True)
    handle = open(BUILD_LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bnlib: another build of this checkout holds {BUILD_LOCK}; waiting for it to finish", file=sys.stderr)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def cell_title(record: RunRecord) -> str:
    """A run page's title, short enough for a phone and the sidebar: 'Fashion-MNIST, batch 2, i.i.d., seed 0,
    40,000 steps' (the cell id follows under it)."""
    cfg = record.config
    classes = cfg.get("classes_per_batch")
    batches = "i.i.d." if cfg.get("sampler") == "iid" else f"{classes} class{'es' if classes != 1 else ''} per batch"
    budget = tables_mod.budget_label(cfg)
    count, unit = budget.split(" ", 1)
    return (
        f"{DATASET_NAMES.get(cfg['dataset'], cfg['dataset'])}, batch {cfg['batch_size']}, {batches}, "
        f"seed {cfg.get('seed', 0)}, {float(count):,.0f} {unit}"
    )


def _curves_cell(record: RunRecord) -> nbformat.NotebookNode:
    """A cell showing a reused cell's curves, drawn from its record (its notebook has none: it trained nothing)."""
    import matplotlib.pyplot as plt

    from .. import plots

    fig = plots.cell_curves(record)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    output = nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png.getvalue()).decode()})
    cell = nbformat.v4.new_code_cell(
        "# the curves of the cell it reuses, drawn from this cell's record", outputs=[output]
    )
    cell.metadata["tags"] = ["remove-input"]
    return cell


def gather_runs(folder: Path) -> int:
    """Copy the grid's executed cell notebooks into the book, titled by their cell ids, and its aggregated
    tables (:data:`TABLE_FILES`) for download (results untouched). Called by the book's Sphinx extension
    (:mod:`bnlib.book_extension`) at the start of every build."""
    for target in (CELLS_DIR, paths.BOOK_TABLES):
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    for name in TABLE_FILES:
        if (folder / name).exists():
            shutil.copy2(folder / name, paths.BOOK_TABLES / name)
    count = 0
    for path in sorted((folder / "runs").glob("*.ipynb")):
        if not (folder / "runs" / f"{path.stem}.json").exists():
            continue  # failed or unfinished cells are not part of the study
        nb = nbformat.read(path, as_version=4)
        record = read_run(folder / "runs" / f"{path.stem}.json")
        title = f"# {cell_title(record)}\n\nCell `{path.stem}`."
        for cell in nb.cells:
            if cell.cell_type == "markdown" and cell.source.startswith("# "):
                cell.source = title + (cell.source[cell.source.index("\n") :] if "\n" in cell.source else "")
                break
        else:  # a notebook without a title (a cell copied from another grid): its page still needs one
            nb.cells.insert(0, nbformat.v4.new_markdown_cell(title))
        if record.same_training_as:
            nb.cells.append(_curves_cell(record))
        nbformat.write(nb, CELLS_DIR / path.name)
        count += 1
    return count


def repository_url() -> str | None:
    """Where the book's source lives, for its repository, Binder and Colab buttons: ``$BNLIB_REPOSITORY_URL``;
    else, in GitHub Actions, the repository being built (``$GITHUB_SERVER_URL/$GITHUB_REPOSITORY``, so a fork
    publishes buttons that open the fork); else ``repository.url`` in _config.yml; else None (no buttons)."""
    if os.environ.get("BNLIB_REPOSITORY_URL"):
        return os.environ["BNLIB_REPOSITORY_URL"].rstrip("/")
    if os.environ.get("GITHUB_REPOSITORY"):
        return f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/{os.environ['GITHUB_REPOSITORY']}"
    return (yaml.safe_load(paths.BOOK_CONFIG.read_text()).get("repository") or {}).get("url")


def _config_with_buttons(url: str, folder: Path) -> Path:
    """_config.yml with the repository and launch buttons turned on for ``url`` (written into ``folder``)."""
    config = yaml.safe_load(paths.BOOK_CONFIG.read_text())
    config["repository"] = {**(config.get("repository") or {}), "url": url, "path_to_book": "", "branch": "main"}
    config["html"] = {**config.get("html", {}), "use_repository_button": True, "use_issues_button": True}
    config["launch_buttons"] = {
        "notebook_interface": "jupyterlab",
        "binderhub_url": "https://mybinder.org",
        "colab_url": "https://colab.research.google.com",
    }
    path = folder / "_config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build(
    grid: str = PUBLISHED_GRID,
    results_root: str | Path | None = None,
    strict: bool = True,
    output: str | Path = paths.ROOT,
) -> Path:
    """Aggregate the grid and build the book offline (warnings as errors) into ``output``/_build/html;
    the build gathers the notebooks. With a :func:`repository_url`, the pages get repository, Binder and
    Colab buttons."""
    from .. import grid as grid_mod

    results_root = paths.results_root(results_root)
    folder = results_root / grid
    if not any((folder / "runs").glob("*.json")):
        raise FileNotFoundError(f"no finished cells in {folder / 'runs'}: run `bnlib run {grid}` first")
    try:  # the grid file's cells only ("default+lr=0.0003": the default grid with that override)
        base, *overrides = grid.split("+")
        cells = {c.id for c in grid_mod.load(base, grid_mod.parse_overrides(overrides)).cells}
    except grid_mod.GridError:
        cells = None  # no grid file of that name here: every finished cell
    tables_mod.aggregate(folder, cells)
    env = {**os.environ, "BNLIB_BOOK_GRID": grid, "BNLIB_RESULTS": str(results_root)}
    exe = Path(sys.executable).with_name("jupyter-book")
    # --all: the pages read results/, which Sphinx cannot see change; never serve numbers from its cache
    cmd = [
        str(exe) if exe.exists() else "jupyter-book",
        "build",
        str(paths.ROOT),
        "--path-output",
        str(output),
        "--all",
    ]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    html_dir = Path(output) / "_build" / "html"
    shutil.rmtree(html_dir, ignore_errors=True)  # no page of an earlier build survives
    with tempfile.TemporaryDirectory() as tmp:
        url = repository_url()
        if url:
            cmd += ["--config", str(_config_with_buttons(url, Path(tmp)))]
        proc = subprocess.run(cmd, env=env, cwd=paths.ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}); see the messages above")
    return html_dir / "index.html"
