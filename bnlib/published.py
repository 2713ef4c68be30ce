"""Integrity of a committed (published) grid folder, ``results/<grid>/``: what CI checks before it builds.

Every metrics file parses and names its own cell; every finished cell has its executed notebook, the
notebook parses, its figures are compact and it prints no path of the machine that ran it
(:func:`compact`); the aggregated CSVs are present and equal a
fresh aggregation of the metrics files. A problem raises :class:`PublishedError` naming the file.
"""

from __future__ import annotations

import base64
import io
import re
import tempfile
from pathlib import Path

import nbformat
import pandas as pd

from . import tables
from .record import CorruptRun, atomic_write, read_run

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
            raise PublishedError(
                f"{path}: a prefix re-execution (stopped at step {run.stopped_at_step} by `bnlib verify "
                "--steps`), not a finished cell; restore it from git or re-run its cell"
            )
        notebook = path.with_suffix(".ipynb")
        if not notebook.exists():
            raise PublishedError(f"{notebook}: missing (the notebook of finished cell {path.stem})")
        try:
            nb = nbformat.read(notebook, as_version=4)
        except Exception as err:  # noqa: BLE001 - any parse failure is a corrupt notebook
            raise PublishedError(f"{notebook}: not a readable notebook ({err})") from None
        if found := machine_paths(nb):
            raise PublishedError(
                f"{notebook}: prints a path of the machine that ran it ({found[0]}); run `bnlib compact "
                f"{grid_dir.name}` (it makes them relative) and commit it"
            )
        if any(not _is_palette_png(o["data"]["image/png"]) for o in _png_outputs(nb)):
            raise PublishedError(
                f"{notebook}: has full-colour PNG figures; run `bnlib compact {grid_dir.name}` "
                "(256-colour figures keep the committed results small) and commit it"
            )
    for name in TABLES:
        if not (grid_dir / f"{name}.csv").exists():
            raise PublishedError(
                f"{grid_dir / f'{name}.csv'}: missing; run `bnlib aggregate {grid_dir.name}` and commit it"
            )
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
                raise PublishedError(
                    f"{committed}: differs from a fresh aggregation of {runs} ({str(err).splitlines()[0]}); "
                    f"run `bnlib aggregate {grid_dir.name}` and commit it"
                ) from None
    return len(metrics)


# --- compact figures ------------------------------------------------------------------------------
# A run notebook's figures are a view of its metrics file (which holds every number); stored as 256-colour
# palette PNGs they take about a third of the bytes and look the same, which keeps results/ small enough to
# publish (the matplotlib PNGs were 80% of the notebooks' bytes).


def _png_outputs(nb) -> list[dict]:
    return [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def _is_palette_png(b64: str) -> bool:
    head = base64.b64decode(b64[:44])  # the IHDR chunk: colour type is byte 25, 3 = palette
    return len(head) > 25 and head[25] == 3


def compact_png(b64: str) -> str:
    """A base64 PNG re-encoded as a 256-colour palette PNG (unchanged if it already is one)."""
    from PIL import Image

    if _is_palette_png(b64):
        return b64
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    opaque = image.mode == "RGB" or (image.mode == "RGBA" and image.getchannel("A").getextrema()[0] == 255)
    if opaque:  # matplotlib's figures: median cut, no dithering, keeps thin lines and text crisp
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    else:  # transparency: the quantiser that keeps an alpha channel
        palette = image.convert("RGBA").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, "PNG", optimize=True, dpi=image.info.get("dpi", (72, 72)))
    return base64.b64encode(out.getvalue()).decode("ascii")


# --- no machine's paths ----------------------------------------------------------------------------
# papermill writes the paths it was given into a run notebook (its parameters cell and metadata), and a cell's
# streams may print some (a warning's source file): absolute paths of the machine that ran it, meaningless elsewhere.
# Committed notebooks keep them relative to the repository (or the installed package); no number is touched.

MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:tmp|home|root|work|Users|private|scratch|var/folders)/[^\s\"'<>|]*")
_ANCHORS = ("results/", "book/", "tests/", "bnlib/", "site-packages/")


def _relative(match: re.Match) -> str:
    """A machine path from the first folder the repository or an installed package knows, else its file name."""
    path = match.group(0)
    found = [i for anchor in _ANCHORS if (i := path.find("/" + anchor)) >= 0]
    return path[min(found) + 1 :] if found else path.rstrip("/").rsplit("/", 1)[-1]


def _map_text(value, fn):
    """A notebook's JSON with ``fn`` applied to every string in it, figures aside."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: v if str(k).startswith("image/") else _map_text(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_text(v, fn) for v in value]
    return value


def machine_paths(value) -> list[str]:
    """Every machine path in a notebook's text (figures aside): its sources, outputs and metadata."""
    found = []

    def collect(text: str) -> str:
        found.extend(MACHINE_PATH.findall(text))
        return text

    _map_text(value, collect)
    return found


def compact_notebook(path: str | Path) -> int:
    """Re-encode a notebook's PNG figures as palette PNGs (:func:`compact_png`) and make the paths it prints
    relative (:data:`MACHINE_PATH`), in place and atomically; returns the bytes saved (0 and the file untouched when
    there is nothing to do)."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    outputs = [o for o in _png_outputs(nb) if not _is_palette_png(o["data"]["image/png"])]
    if not outputs and not machine_paths(nb):
        return 0
    before = path.stat().st_size
    for o in outputs:
        o["data"]["image/png"] = compact_png(o["data"]["image/png"])
    nb = nbformat.from_dict(_map_text(nb, lambda text: MACHINE_PATH.sub(_relative, text)))
    atomic_write(path, nbformat.writes(nb) + "\n")
    return before - path.stat().st_size


def compact(grid_dir: str | Path) -> tuple[int, int]:
    """Compact the notebooks of a grid folder's finished cells (those with a metrics file; a running cell's
    notebook is papermill's to write). Returns (notebooks rewritten, bytes saved)."""
    rewritten = saved = 0
    for metrics in sorted((Path(grid_dir) / "runs").glob("*.json")):
        notebook = metrics.with_suffix(".ipynb")
        if notebook.exists() and (n := compact_notebook(notebook)):
            rewritten, saved = rewritten + 1, saved + n
    return rewritten, saved
