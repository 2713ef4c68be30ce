"""The book: what its pages compute from ``results/<grid>/``, and the offline build.

Pages call :func:`tables` for the grid being shown (``BNLIB_BOOK_GRID``, default ``default``; results in
``BNLIB_RESULTS``, default ``results/``) and glue every number they print, so no number is typed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pandas as pd

from . import norms, results

ROOT = Path(__file__).resolve().parent.parent
CELLS_DIR = ROOT / "book" / "runs" / "cells"
BUILD_DIR = ROOT / "_build"


def grid_name() -> str:
    return os.environ.get("BNLIB_BOOK_GRID", "default")


def results_dir() -> Path:
    return Path(os.environ.get("BNLIB_RESULTS", ROOT / "results")).resolve()


@dataclass
class Tables:
    grid: str
    folder: Path
    evaluations: pd.DataFrame
    training_loss: pd.DataFrame
    summary: pd.DataFrame
    summary_recomputed: pd.DataFrame | None
    runs: list[dict]
    cell_log: pd.DataFrame


def tables(grid: str | None = None, folder: Path | None = None) -> Tables:
    grid = grid or grid_name()
    folder = folder or results_dir() / grid
    if not (folder / "summary.csv").exists():
        raise FileNotFoundError(f"{folder / 'summary.csv'} is missing: run `bnlib run {grid}` (it aggregates) first")
    read = lambda name: pd.read_csv(folder / f"{name}.csv") if (folder / f"{name}.csv").exists() else None  # noqa: E731
    log = folder / "cells.jsonl"
    cell_log = pd.DataFrame([json.loads(line) for line in log.read_text().splitlines() if line.strip()]) if log.exists() else pd.DataFrame()
    return Tables(grid, folder, read("evaluations"), read("training_loss"), read("summary"), read("summary_recomputed"),
                  results.load_runs(folder / "runs"), cell_log)


# --- numbers for the prose ------------------------------------------------------------------------


def pp(x: float) -> float:
    """A fraction as percentage points."""
    return 100.0 * float(x)


def verdict(low: float, high: float, better: str = "above", worse: str = "below") -> str:
    """Words for a paired difference from its 95% interval: only an interval that excludes 0 gets a direction."""
    if pd.isna(low) or pd.isna(high):
        return "not estimable (a single seed)"
    if low > 0:
        return better
    if high < 0:
        return worse
    return "indistinguishable from"


def standard_placement(frame: pd.DataFrame) -> pd.DataFrame:
    """Only the rows of the original network (a norm after every conv) when a grid also varies the placement."""
    if "norm_placement" in frame and (frame["norm_placement"] == "all").any():
        return frame[frame["norm_placement"] == "all"]
    return frame


def headline(summary: pd.DataFrame) -> dict:
    """The numbers of the one-paragraph answer: the first dataset, i.i.d. batches, smallest and largest batch."""
    s = summary.copy()
    s["method"] = s["method"].astype(str)
    dataset = sorted(s["dataset"].unique())[0]
    part = s[(s["dataset"] == dataset) & (s["sampler"] == "iid")] if (s["sampler"] == "iid").any() else s[s["dataset"] == dataset]
    part = standard_placement(part)
    if "budget" in part:
        part = part[part["budget"] == sorted(part["budget"].unique())[0]]
    small, large = int(part["batch_size"].min()), int(part["batch_size"].max())
    facts: dict = {"dataset": dataset, "small": small, "large": large, "budget": str(part["budget"].iloc[0]),
                   "n_seeds": int(part["n_seeds"].min())}
    for size, tag in ((small, "small"), (large, "large")):
        rows = part[part["batch_size"] == size].set_index("method")
        if "bn" in rows.index:
            facts[f"bn_{tag}"] = pp(rows.loc["bn", "mean"])
            facts[f"bn_{tag}_low"], facts[f"bn_{tag}_high"] = pp(rows.loc["bn", "ci_low"]), pp(rows.loc["bn", "ci_high"])
        for m in rows.index:
            if m == "bn" or pd.isna(rows.loc[m, "diff_vs_bn"]):
                continue
            facts[f"{m}_{tag}_diff"] = pp(rows.loc[m, "diff_vs_bn"])
            facts[f"{m}_{tag}_low"], facts[f"{m}_{tag}_high"] = pp(rows.loc[m, "diff_ci_low"]), pp(rows.loc[m, "diff_ci_high"])
            facts[f"{m}_{tag}_verdict"] = verdict(rows.loc[m, "diff_ci_low"], rows.loc[m, "diff_ci_high"])
            facts[f"{m}_{tag}_mean"] = pp(rows.loc[m, "mean"])
        best = rows["mean"].astype(float).idxmax()
        facts[f"best_{tag}"], facts[f"best_{tag}_acc"] = norms.display_name(best), pp(rows.loc[best, "mean"])
    return facts


def _fmt(mean: float, low: float, high: float, signed: bool = False) -> str:
    """A fraction as 'mean [low, high]' in percent (points with a sign for differences)."""
    if pd.isna(mean):
        return "–"
    f = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    return f(mean) + ("" if pd.isna(low) else f" [{f(low)}, {f(high)}]")


def summary_tables(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per condition (dataset, sampler, budget, ...): methods x batch sizes, final accuracy in % with its 95%
    interval, and beside each batch size the paired difference against BN in points with its interval."""
    s = summary.copy()
    s["method"] = s["method"].astype(str)
    keys = [k for k in ("dataset", "budget", "sampler", "norm_placement", "classes_per_batch") if k in s]
    keys = [k for k in keys if k in ("dataset", "sampler") or s[k].nunique(dropna=False) > 1]
    out = []
    for cond, part in s.groupby([k for k in keys if k != "classes_per_batch"], dropna=False, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        title = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in zip(keys, cond))
        rows = {}
        for m, g in part.groupby("method", sort=False):
            row = {}
            for r in g.sort_values("batch_size").itertuples():
                row[(f"batch {r.batch_size}", "accuracy (%)")] = _fmt(r.mean, r.ci_low, r.ci_high)
                diff = getattr(r, "diff_vs_bn", float("nan"))
                row[(f"batch {r.batch_size}", "vs BN (points)")] = "" if m == "bn" else _fmt(diff, r.diff_ci_low, r.diff_ci_high, signed=True)
                if r.diverged:
                    row[(f"batch {r.batch_size}", "accuracy (%)")] += f" ({r.diverged} diverged)"
            rows[norms.display_name(m)] = row
        order = [norms.display_name(m) for m in norms.METHODS if norms.display_name(m) in rows]
        table = pd.DataFrame(rows).T.loc[order]
        table.columns = pd.MultiIndex.from_tuples(table.columns)
        table = table[sorted(table.columns, key=lambda c: (int(c[0].split()[1]), c[1]))]
        out.append((f"{title} ({int(part['n_seeds'].min())} seeds)", table))
    return out


# --- building ------------------------------------------------------------------------------------


def gather_runs(folder: Path) -> int:
    """Copy the grid's executed cell notebooks into the book, titled by their cell ids (results untouched)."""
    if CELLS_DIR.exists():
        shutil.rmtree(CELLS_DIR)
    CELLS_DIR.mkdir(parents=True)
    count = 0
    for path in sorted((folder / "runs").glob("*.ipynb")):
        if not (folder / "runs" / f"{path.stem}.json").exists():
            continue  # failed or unfinished cells are not part of the study
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown" and cell.source.startswith("# "):
                cell.source = f"# Cell `{path.stem}`" + cell.source[cell.source.index("\n"):] if "\n" in cell.source else f"# Cell `{path.stem}`"
                break
        nbformat.write(nb, CELLS_DIR / path.name)
        count += 1
    return count


def build(grid: str = "default", results_root: str | Path = "results", strict: bool = True) -> Path:
    """Aggregate the grid, gather its run notebooks, and build the book offline (warnings as errors)."""
    folder = Path(results_root).resolve() / grid
    results.aggregate(folder)
    n = gather_runs(folder)
    if n == 0:
        raise FileNotFoundError(f"no finished cell notebooks in {folder / 'runs'}: run `bnlib run {grid}` first")
    env = {**os.environ, "BNLIB_BOOK_GRID": grid, "BNLIB_RESULTS": str(Path(results_root).resolve())}
    exe = Path(sys.executable).with_name("jupyter-book")
    # --all: the pages read results/, which Sphinx cannot see change; never serve numbers from its cache
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(ROOT), "--path-output", str(ROOT), "--all"]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    shutil.rmtree(BUILD_DIR / "html", ignore_errors=True)  # no page of an earlier build survives
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}); see the messages above")
    return BUILD_DIR / "html" / "index.html"
