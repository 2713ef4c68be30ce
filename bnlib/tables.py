"""Run records -> the tidy tables of a grid -> CSV files the book reads.

:func:`evaluations` gathers every run of a grid into one tidy table (a row per cell x method x evaluation),
:func:`training_losses` the training-loss windows; :func:`aggregate` writes them with the summaries of
:mod:`bnlib.stats` (final accuracy per method and condition, paired differences against BN) and the plateau status
of every method (:func:`bnlib.analysis.plateau`; a grid with a pre-registered plan, :data:`bnlib.analysis.PLANS`, or
with the 2x2 mechanism design also gets the plan's comparisons, ``analysis.csv``) into ``results/<grid>/*.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import analysis, stats
from .record import RunRecord, atomic_write, load_runs

# Condition columns that identify a comparison (everything a grid may vary except the seed).
CONDITION_KEYS = stats.CONDITION_KEYS


def budget_label(config: dict) -> str:
    if config.get("steps") is not None:
        return f"{config['steps']} steps"
    if config.get("samples") is not None:
        return f"{config['samples']} samples"
    return f"{config['epochs']:g} epochs"


def run_keys(run: RunRecord) -> dict:
    """What every tidy table says of a run: its cell, seed, budget and condition (:data:`CONDITION_KEYS`)."""
    cfg = run.config
    return {
        "cell": run.cell,
        "seed": cfg["seed"],
        "budget": budget_label(cfg),
        **{k: cfg[k] for k in CONDITION_KEYS if k in cfg},
    }


def evaluations(runs: list[RunRecord]) -> pd.DataFrame:
    """The tidy table: one row per cell x method x evaluation."""
    rows = []
    for run in runs:
        base = {
            "cell": run.cell,
            "seed": run.config["seed"],
            "budget": budget_label(run.config),
            "steps_total": run.steps,
            "num_classes": run.num_classes,
            "device": run.device,
            "device_name": run.provenance.device_name,
            **run_keys(run),
        }  # the run's keys, with what evaluations add after its budget (the CSV's column order)
        for method, rec in run.methods.items():
            common = {
                **base,
                "method": method,
                "diverged": rec.diverged,
                "diverged_step": rec.diverged_step,
                "train_seconds": rec.train_seconds,
                "samples_per_second": rec.samples_per_second,
            }
            n = len(rec.eval_step)
            sizes = rec.eval_size or [run.test_size] * n  # test images per evaluation (a subset in training)
            batchstats = rec.test_acc_batchstats or [None] * n  # absent from files written before it existed
            for i, step in enumerate(rec.eval_step):
                rows.append(
                    {
                        **common,
                        "step": step,
                        "samples_seen": step * run.config["batch_size"],
                        "eval_size": sizes[i],
                        "test_acc": rec.test_acc[i],
                        "test_loss": rec.test_loss[i],
                        "test_acc_recomputed": rec.test_acc_recomputed[i],
                        "test_loss_recomputed": rec.test_loss_recomputed[i],
                        "test_acc_batchstats": batchstats[i],
                        "final": i == n - 1 and not rec.diverged,
                        # the split scored, where the dataset has a validation split (older files: no column)
                        **({"split": rec.eval_split[i]} if rec.eval_split else {}),
                    }
                )
            if rec.diverged or n == 0:  # a row that says the run ended without a final evaluation
                rows.append(
                    {
                        **common,
                        "step": rec.diverged_step,
                        "samples_seen": None,
                        "eval_size": None,
                        "test_acc": None,
                        "test_loss": None,
                        "test_acc_recomputed": None,
                        "test_loss_recomputed": None,
                        "test_acc_batchstats": None,
                        "final": True,
                    }
                )
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["classes_per_batch"] = frame["classes_per_batch"].astype("Int64")
    return frame


def training_losses(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per cell x method x logged training-loss window."""
    rows = []
    for run in runs:
        base = run_keys(run)
        for method, rec in run.methods.items():
            for step, loss in zip(rec.train_step, rec.train_loss):
                rows.append(
                    {
                        **base,
                        "method": method,
                        "step": step,
                        "samples_seen": step * run.config["batch_size"],
                        "train_loss": loss,
                    }
                )
    return pd.DataFrame(rows)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def aggregate(grid_dir: str | Path, cells: set[str] | None = None) -> dict[str, Path]:
    """Read every finished cell of ``results/<grid>/`` and write the tables the book reads. With ``cells``
    (the grid file's cell ids), metrics files of other cells - left from an earlier version of the grid file -
    are left out and named, so changed settings never mix into one condition."""
    grid_dir = Path(grid_dir)
    runs = load_runs(grid_dir / "runs")
    if cells is not None:
        others = sorted(r.cell for r in runs if r.cell not in cells)
        if others:
            print(
                f"aggregate: left out {len(others)} finished cells that {grid_dir.name}'s grid file no longer has "
                f"(settings changed since they ran): {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}"
            )
        runs = [r for r in runs if r.cell in cells]
    if not runs:
        raise FileNotFoundError(f"no finished cells in {grid_dir / 'runs'}: run the grid first (bnlib run ...)")
    table = evaluations(runs)
    losses = training_losses(runs)
    frames = {
        "evaluations": table,
        "training_loss": losses,
        "summary": stats.summarise(table),
        "plateau": analysis.plateau(table),
        "convergence": analysis.convergence(table),
    }
    plan = analysis.plan_for(grid_dir.name)  # the grid's pre-registered plan (book/analysis-plan.md), if it has one
    if plan is not analysis.NO_PLAN or set(analysis.CORNERS) <= set(table["method"]):
        frames["analysis"] = analysis.comparisons(table, losses, plan)
    if plan is not analysis.NO_PLAN:  # its summary's verdicts are the plan's
        frames["summary"] = analysis.with_plan(frames["summary"], frames["analysis"])
    secondary = {"summary_recomputed": "test_acc_recomputed", "summary_batchstats": "test_acc_batchstats"}
    for name, column in secondary.items():  # exploratory by a plan: its correction, not a Holm of their own
        if table[column].notna().any():
            frame = stats.summarise(table[table[column].notna() | table["diverged"]], column)
            frames[name] = frame if plan is analysis.NO_PLAN else analysis.exploratory_summary(frame)
    trace = traces(runs)
    if len(trace):
        frames["traces_summary"] = trace_summary(trace)
    return {name: write_csv(frame, grid_dir / f"{name}.csv") for name, frame in frames.items()}


def traces(runs: list[RunRecord]) -> pd.DataFrame:
    """The norm layers' traces (``trace_every``; :mod:`bnlib.train.traces`) as a tidy table: one row per cell x method x
    layer x traced step, a column per metric. Built from the metrics files when a page needs it (not written to a
    CSV whole: a grid's traces are millions of numbers; :func:`trace_summary` is)."""
    frames = []
    for run in runs:
        base = run_keys(run)
        for method, rec in run.methods.items():
            if not rec.traces:
                continue
            for layer, values in enumerate(rec.traces["layers"]):
                frame = pd.DataFrame({"step": rec.traces["step"], **values})
                frames.append(frame.assign(**base, method=method, layer=layer + 1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


TRACE_PHASES = {"first": 0.0, "half": 0.5, "last": 1.0}  # where in the run a trace is read: start, the lr drop, end


def trace_summary(trace: pd.DataFrame) -> pd.DataFrame:
    """``traces_summary.csv``: per condition, method and norm layer, every trace metric at the first traced step, at
    the traced step nearest half the run (where the step schedule drops the learning rate) and at the last, as the
    mean over seeds (``n_seeds`` of them) -- what the book's read-outs of the traces quote."""
    from .train.traces import METRICS

    keys = [k for k in CONDITION_KEYS if k in trace]
    steps = {cell: np.unique(s) for cell, s in trace.groupby("cell")["step"]}
    frames = []
    for phase, at in TRACE_PHASES.items():  # per cell, the traced step nearest the phase (the earlier one of a tie)
        chosen = {cell: s[np.argmin(np.abs(s - (s[0] + at * (s[-1] - s[0]))))] for cell, s in steps.items()}
        frames.append(trace[trace["step"] == trace["cell"].map(chosen)].assign(phase=phase))
    picked = pd.concat(frames, ignore_index=True)
    metrics = [k for k in METRICS if k in picked]  # cells traced before a metric existed lack it
    picked[metrics] = picked[metrics].astype(float)
    grouped = picked.groupby([*keys, "method", "layer", "phase"], dropna=False, sort=False)
    out = (
        grouped[metrics]
        .mean()
        .join(grouped["seed"].nunique().rename("n_seeds"))
        .join(grouped["step"].median().rename("step"))
        .reset_index()
    )
    return out[[*keys, "method", "layer", "phase", "step", "n_seeds", *metrics]]
