"""The tables the book's pages read: a grid's aggregates under ``results/<grid>/`` (the grid being shown is
``BNLIB_BOOK_GRID``, default ``study``, the published grid; results in ``BNLIB_RESULTS``, default the repository's
``results/``), the mechanism grids', the original study's figures, and the slices of them the pages share.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import paths, stats
from ..plots import display_name
from ..record import RunRecord, load_runs

PUBLISHED_GRID = "study"


def grid_name() -> str:
    return os.environ.get("BNLIB_BOOK_GRID", PUBLISHED_GRID)


def results_dir() -> Path:
    return paths.results_root()


@dataclass
class Tables:
    grid: str
    folder: Path
    evaluations: pd.DataFrame
    training_loss: pd.DataFrame
    summary: pd.DataFrame
    summary_recomputed: pd.DataFrame | None
    summary_batchstats: pd.DataFrame | None
    runs: list[RunRecord]
    cell_log: pd.DataFrame
    plateau: pd.DataFrame | None = None  # plateau.csv: each method's status by the plan's plateau criterion


def tables(grid: str | None = None, folder: Path | None = None) -> Tables:
    grid = grid or grid_name()
    folder = folder or results_dir() / grid
    if not (folder / "summary.csv").exists():
        raise FileNotFoundError(f"{folder / 'summary.csv'} is missing: run `bnlib run {grid}` (it aggregates) first")

    def read(name):
        return pd.read_csv(folder / f"{name}.csv") if (folder / f"{name}.csv").exists() else None

    log = folder / "cells.jsonl"
    cell_log = (
        pd.DataFrame([json.loads(line) for line in log.read_text().splitlines() if line.strip()])
        if log.exists()
        else pd.DataFrame()
    )
    return Tables(
        grid,
        folder,
        read("evaluations"),
        read("training_loss"),
        read("summary"),
        read("summary_recomputed"),
        read("summary_batchstats"),
        load_runs(folder / "runs"),
        cell_log,
        read("plateau"),
    )


def standard_placement(frame: pd.DataFrame) -> pd.DataFrame:
    """Only the rows of the original network (a norm after every conv) when a grid also varies the placement."""
    if "norm_placement" in frame and (frame["norm_placement"] == "all").any():
        return frame[frame["norm_placement"] == "all"]
    return frame


def headline_condition(summary: pd.DataFrame, sampler: str = "iid") -> pd.DataFrame:
    """The summary rows of the condition the answer is told on: the harder real dataset when the grid has it
    (Fashion-MNIST in the published study, else the first), ``sampler``'s batches (when the grid has them), the
    original network, the equal-samples budget when the grid has several; every batch size."""
    s = summary.copy()
    s["method"] = s["method"].astype(str)
    dataset = "fashionmnist" if (s["dataset"] == "fashionmnist").any() else sorted(s["dataset"].unique())[0]
    part = (
        s[(s["dataset"] == dataset) & (s["sampler"] == sampler)]
        if (s["sampler"] == sampler).any()
        else s[s["dataset"] == dataset]
    )
    part = standard_placement(part)
    if "budget" in part and part.groupby("batch_size")["budget"].nunique().max() > 1:
        # equal samples (a budget in samples or epochs) when a batch size has several; a grid that gives each batch
        # size its own budget (trained to a plateau) keeps them all
        budgets = sorted(part["budget"].unique(), key=lambda b: (str(b).endswith(" steps"), str(b)))
        part = part[part["budget"] == budgets[0]]
    return part


def convergence(folder: Path) -> pd.DataFrame:
    """``convergence.csv`` (:func:`bnlib.analysis.convergence`) of the original network, beside each method's plateau
    status from ``plateau.csv``; empty where the grid has neither."""
    path, status = folder / "convergence.csv", folder / "plateau.csv"
    if not path.exists():
        return pd.DataFrame()
    speed = standard_placement(pd.read_csv(path))
    if status.exists():
        plateau = pd.read_csv(status)
        keys = [k for k in (*stats.CONDITION_KEYS, "method") if k in speed and k in plateau]
        status_columns = [c for c in ("plateaued", "gain_last_quarter", "gain_ci_high") if c in plateau]
        speed = speed.merge(plateau[[*keys, *status_columns]], on=keys, how="left")
    return speed[speed["level"].notna()]


def run_commits(runs_dir: Path) -> list[str]:
    """The short git commits whose code ran a grid's finished cells, in the order they first finished."""
    runs = sorted(load_runs(runs_dir), key=lambda r: r.provenance.finished_at or "")
    return list(dict.fromkeys((r.provenance.git_commit or "unknown")[:7] for r in runs))


def seed_halfwidths(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Half-width of the paired interval against BN by number of seeds, for every comparison of the grid."""
    final = stats.final_scores(evaluations)
    final = final[final["score"].notna()]
    keys = [k for k in stats.CONDITION_KEYS if k in final]
    return stats.halfwidth_by_seeds(final, keys)


def diverged_runs(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Every diverged run by cell (it counts as chance accuracy in the statistics)."""
    div = evaluations[evaluations["diverged"].astype(bool) & evaluations["final"].astype(bool)]
    cols = [
        c for c in ("cell", "method", "dataset", "budget", "batch_size", "sampler", "seed", "diverged_step") if c in div
    ]
    return div[cols].assign(method=div["method"].map(display_name)).reset_index(drop=True)


# The grid's aggregated tables, as the appendix "All results" offers them for download (those a grid computed)
TABLE_FILES = {
    "summary.csv": "final accuracy per method and condition, with the comparisons against BN",
    "summary_recomputed.csv": "the same after recomputing population statistics",
    "summary_batchstats.csv": "the same with batch statistics at test time",
    "plateau.csv": "every method's plateau status by the analysis plan's criterion",
    "convergence.csv": "how fast each method converges: steps and images to BN's level and to its own",
    "analysis.csv": "the analysis plan's comparisons (mechanism grids)",
    "evaluations.csv": "every evaluation of every run",
    "training_loss.csv": "every training-loss window of every run",
    "cells.jsonl": "the runner's log: one line per cell run",
}


ORIGINAL_CSV = paths.BOOK_DATA / "original_study.csv"


ORIGINAL_DATASETS = {"mnist": ("mnist5k", "fashionmnist"), "cifar100": ()}  # ours that stand in for theirs


def original_results() -> pd.DataFrame:
    """The original study's final accuracies (%), read off its figures; one run each (see the file's source column)."""
    return pd.read_csv(ORIGINAL_CSV)


def equal_steps(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows of the original's budget (the same number of steps at every batch size), i.i.d., original network."""
    s = standard_placement(summary)
    s = s[(s["sampler"] == "iid") & s["budget"].astype(str).str.endswith(" steps")]
    return s.assign(method=s["method"].astype(str))


MECHANISM_GRID = "mechanism"


ROBUSTNESS_GRID = "mechanism-robustness"  # the 2x2 under other optimisers and learning rates (its own family)


def mechanism_tables(folder: Path | None = None, grid: str = MECHANISM_GRID) -> Tables | None:
    """The tables of the mechanism grid (or of ``grid``, e.g. its robustness checks) from the results folder in use
    (:func:`results_dir`) where it holds them, else the repository's committed ``results/<grid>/`` (a book of the
    smoke grid still shows the committed mechanism); None before any of its cells is committed."""
    if folder is None:
        here = results_dir() / grid
        folder = here if (here / "summary.csv").exists() else paths.ROOT / "results" / grid
    return tables(grid, folder) if (folder / "summary.csv").exists() else None


def cost_per_step(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Median training milliseconds per step, one row per method and one column per batch size and machine: time per
    step is only comparable on one machine, and a grid's groups of methods may have run on different ones."""
    final = evaluations[evaluations["final"]]
    ms = final.assign(
        ms=1000 * final["train_seconds"] / final["steps_total"],
        machine=final["device_name"].fillna("unknown machine").astype(str).str.replace(r"\(R\)", "", regex=True),
    )
    table = (
        ms.groupby(["method", "batch_size", "machine"])["ms"]
        .median()
        .unstack(["batch_size", "machine"])
        .sort_index(axis=1)
    )
    table.columns = [f"batch {b}, {m}" for b, m in table.columns]
    table.index = [display_name(m) for m in table.index]
    return table.round(1)


BATCHSTATS_GRID = "mechanism-batchstats"  # the reversal's check: one-class networks on one-class test batches


def layer_means(trace_summary: pd.DataFrame, phase: str) -> pd.DataFrame:
    """The trace summary at one phase, averaged over the norm layers: a row per condition (batch_size, sampler) and
    method."""
    part = trace_summary[trace_summary["phase"] == phase]
    metrics = [
        c
        for c in part.columns
        if c in ("log_r_p90", "d_p90", "conv_weight_norm", "gamma_norm", "input_rms", "conv_grad_norm")
    ]
    return part.groupby(["batch_size", "sampler", "method"], sort=False)[[*metrics, "n_seeds"]].mean()


def comparison_row(
    comparisons: pd.DataFrame, name: str, batch: int, sampler: str, outcome: str = "accuracy"
) -> dict | None:
    """One comparison's row of an analysis.csv at a condition, as a dict (None where it was not made)."""
    rows = comparisons[
        (comparisons["comparison"] == name)
        & (comparisons["batch_size"] == batch)
        & (comparisons["sampler"] == sampler)
        & (comparisons["outcome"] == outcome)
    ]
    return None if rows.empty else rows.iloc[0].to_dict()
